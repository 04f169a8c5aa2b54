"""How accurate is the σ + cross-entropy gradient in half precision, at confident targets?

    python -m scripts.half_precision_gradients [--tokens 512] [--vocab 1024] [--seed 0]

For logits in bfloat16 and float16 whose target is increasingly confident, prints the median
relative error (against float64) of the target logit's gradient over the tokens with
p_t > 0.99, and the share of those gradients that are exactly 0, for the chunked loss
(eager and compiled kernels) and for autograd through ``F.cross_entropy(σ(z.float()))``,
the float32 reference a user would otherwise run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import multimax
from multimax.chunked_loss import sigma_cross_entropy


def target_gradients(loss_of, z: torch.Tensor, rows, target) -> torch.Tensor:
    z = z.clone().requires_grad_()
    loss_of(z).sum().backward()
    return z.grad.double()[rows, target]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    sigma = multimax.MultiMax(order=2)
    with torch.no_grad():  # a trained-looking σ rather than the near-identity initialisation
        for p in sigma.parameters():
            p.normal_(0, 0.1)
    rows = torch.arange(args.tokens)
    target = torch.randint(0, args.vocab, (args.tokens,))
    z64 = torch.randn(args.tokens, args.vocab, dtype=torch.float64) * 2
    z64[rows, target] += torch.linspace(0, 14, args.tokens, dtype=torch.float64)
    print("| dtype | computation | median relative error at p_t > 0.99 | share exactly 0 |")
    print("|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16):
        z = z64.to(dtype)
        exact = target_gradients(
            lambda x: F.cross_entropy(sigma.modulate(x), target, reduction="none"), z.double(),
            rows, target,
        )  # fmt: skip
        with torch.no_grad():
            confident = torch.softmax(sigma.modulate(z.double()), -1)[rows, target] > 0.99
        candidates = {
            "chunked, eager kernels": lambda x: sigma_cross_entropy(x, target, sigma, compiled=False),
            "chunked, compiled kernels": lambda x: sigma_cross_entropy(x, target, sigma, compiled=True),
            "autograd, F.cross_entropy(σ(z.float()))": lambda x: F.cross_entropy(
                sigma.modulate(x.float()), target, reduction="none"
            ),
        }  # fmt: skip
        for name, loss_of in candidates.items():
            grad = target_gradients(loss_of, z, rows, target)
            error = ((grad - exact).abs() / exact.abs())[confident].median()
            zeros = (grad[confident] == 0).double().mean()
            print(f"| {str(dtype).removeprefix('torch.')} | {name} | {error:.2e} | {zeros:.2f} |")


if __name__ == "__main__":
    main()
