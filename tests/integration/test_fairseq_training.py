"""The plugin under the LM / MT recipes' own training settings, built as ``fairseq-train``
builds them: the optimiser's weight-decay groups under every fairseq precision flag, the
output σ's gradient scale under clipping, the criterion's evaluation distribution and
ε-perplexity, the resumable tasks' batches, and NaN fault injection.

The recipes' flags come from the composed configs (``experiments.pipelines.fairseq.commands.train_args``),
with a tiny model and a toy dictionary appended; fairseq's ``options`` parse them exactly as
``fairseq-train`` does, and fairseq's own ``Trainer`` builds the optimiser.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer

import multimax.integrations.fairseq_plugin as plugin
from experiments.pipelines.fairseq import commands
from tests.composition import compose

WORDS = [f"w{i}" for i in range(40)]
TINY_LM = ["--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-input-dim", "16",
           "--decoder-output-dim", "16", "--decoder-ffn-embed-dim", "32",
           "--decoder-attention-heads", "2", "--tokens-per-sample", "16"]  # fmt: skip
# Large enough to see decoupled weight decay in one step even in half precision.
VISIBLE_DECAY = ["--lr", "0.1", "--weight-decay", "0.5", "--warmup-init-lr", "0.1",
                 "--warmup-updates", "1"]  # fmt: skip
PRECISION_FLAGS = ("--fp16", "--bf16", "--fp16-no-flatten-grads", "--amp",
                   "--memory-efficient-fp16", "--memory-efficient-bf16")  # fmt: skip


def lm_dir(tmp: Path) -> Path:
    (tmp / "dict.txt").write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(WORDS)))
    return tmp


def recipe_args(data: Path, precision: list[str], overrides: list[str] = ()) -> list[str]:
    """The LM recipe's ``fairseq-train`` flags (as on a GPU node) on a toy dictionary, with a
    tiny model, on the CPU, with ``precision`` instead of the recipe's precision flags."""
    cfg = compose("language_model", ["experiment=lm_wikitext103", "normalizer=multimax",
                                     *overrides])  # fmt: skip
    args = commands.train_args(cfg, data / "checkpoints", cuda=True)
    assert "--fp16" in args and "--fp16-no-flatten-grads" in args  # what the recipe runs
    args = [a for a in args if a not in PRECISION_FLAGS]
    args[0] = str(data)
    return [*args, *TINY_LM, *VISIBLE_DECAY, "--cpu", *precision]


def build_trainer(args: list[str]):
    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, args))
    if cfg.common.bf16:
        # fairseq 0.12 sends --bf16 to TPUs (options.py sets tpu=True); stand in for the
        # device: the Trainer builds the same FP16Optimizer there.
        cfg.common.tpu = False
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return Trainer(cfg, task, model, criterion), cfg


PRECISIONS = {
    "fp32": [],
    "fp16 (the recipe: --fp16 --fp16-no-flatten-grads)": ["--fp16", "--fp16-no-flatten-grads"],
    "bf16": ["--bf16"],
    "memory_efficient_fp16": ["--memory-efficient-fp16"],
    "memory_efficient_bf16": ["--memory-efficient-bf16"],
    "amp": ["--amp"],
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_sigma_is_not_decayed_under_every_precision_flag(tmp_path, precision):
    """A step with zero gradients through fairseq's own optimiser wrapper moves weights only
    by decoupled weight decay: σ stays put, every other decayed weight shrinks by 1 − lr·wd."""
    trainer, cfg = build_trainer(recipe_args(lm_dir(tmp_path), PRECISIONS[precision]))
    optimizer = trainer.optimizer  # built lazily, as in fairseq-train
    model = trainer.model
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    sigma = [n for n in before if "normalizer" in n]
    assert len(sigma) == 4 * 2  # one MultiMax per attention layer (1 layer) and the output
    zero = sum(p.float().sum() for p in model.parameters()) * 0.0
    optimizer.backward(zero)
    optimizer.step()
    factor = 1 - cfg.optimization.lr[0] * cfg.optimizer.weight_decay
    for name, param in model.named_parameters():
        after = param.detach().float()
        if name in sigma:
            assert torch.equal(after, before[name]), f"{name} was decayed under {precision}"
        elif before[name].abs().sum() > 0:
            expected = before[name] * factor
            torch.testing.assert_close(after, expected, atol=1e-2, rtol=1e-2, msg=name)
    masters = getattr(optimizer, "fp32_params", None)
    if isinstance(masters, list):  # per-parameter fp32 copies keep fairseq's overrides
        assert sum(plugin.optim.is_exempt(p) for p in masters) == len(sigma)


def test_flat_fp16_buffer_is_refused_with_the_flag_to_set(tmp_path, monkeypatch):
    """Plain --fp16 flattens every parameter into one fp32 tensor, which cannot keep σ's
    exemption: fairseq itself refuses multimax_adam there and names the flag."""
    # FP16Optimizer keys its flat buffer on the current CUDA device; stand in for it.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    trainer, _ = build_trainer(recipe_args(lm_dir(tmp_path), ["--fp16"]))
    with pytest.raises(RuntimeError, match="--fp16-no-flatten-grads"):
        trainer.optimizer  # noqa: B018 - building it is the test


def lm_sample(dictionary, batch: int = 3, length: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (batch, length), generator=g)
    return {
        "id": torch.arange(batch),
        "nsentences": batch,
        "ntokens": tokens.numel(),
        "net_input": {"src_tokens": tokens, "src_lengths": torch.full((batch,), length)},
        "target": torch.roll(tokens, -1, dims=1),
    }


def test_output_sigma_grad_scale_keeps_sigma_out_of_the_clipped_norm(tmp_path):
    """``train.output_sigma_grad_scale=inv_sqrt_vocab`` multiplies the output σ's gradients
    by 1/√V and nothing else, so the global norm that ``--clip-norm`` divides by loses σ's
    share; with ``null`` (the recipes' published setting) nothing changes."""
    data = lm_dir(tmp_path)
    grads, norms = {}, {}
    for scale in ("null", "inv_sqrt_vocab"):
        overrides = [f"train.output_sigma_grad_scale={scale}", "train.clip_norm=0.1"]
        torch.manual_seed(0)
        trainer, _ = build_trainer(recipe_args(data, [], overrides))
        assert trainer.cfg.optimization.clip_norm == 0.1
        model, criterion = trainer.model, trainer.criterion
        loss, _, _ = criterion(model, lm_sample(trainer.task.dictionary))
        loss.backward()
        grads[scale] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
        norms[scale] = float(trainer.clip_grad_norm(0.0))  # the norm fairseq would clip by
    vocab = len(trainer.task.dictionary)
    out_sigma = {n for n in grads["null"] if n.startswith("decoder.output_normalizer.")}
    assert len(out_sigma) == 4
    for name, grad in grads["null"].items():
        expected = grad / math.sqrt(vocab) if name in out_sigma else grad
        torch.testing.assert_close(grads["inv_sqrt_vocab"][name], expected, msg=name)
    sigma_sq = sum(float(grads["null"][n].pow(2).sum()) for n in out_sigma)
    assert sigma_sq > 0
    expected_norm = math.sqrt(norms["null"] ** 2 - sigma_sq * (1 - 1 / vocab))
    assert norms["inv_sqrt_vocab"] == pytest.approx(expected_norm, rel=1e-5)


@pytest.mark.parametrize("output", ["evsoftmax", "sparsemax", "entmax15", "multimax"])
def test_validation_uses_the_evaluation_distribution_and_reports_eps_perplexity(tmp_path, output):
    """In ``model.eval()`` the criterion's nll is −log p under the distribution the model
    predicts at evaluation (evsoftmax: exact zeros below the row mean, not the ε training
    weights), and it logs the ε-perplexity and the share of zero-probability targets."""
    from fairseq import metrics

    from multimax.metrics import epsilon_log_likelihood

    data = lm_dir(tmp_path)
    overrides = [f"normalizer={output}"]
    torch.manual_seed(0)
    trainer, cfg = build_trainer(recipe_args(data, [], overrides))
    model, criterion = trainer.model, trainer.criterion
    sample = lm_sample(trainer.task.dictionary, batch=4)
    target = sample["target"].reshape(-1)
    model.eval()
    with torch.no_grad():
        _, _, log = criterion(model, sample)
        logits = model(**sample["net_input"])[0].reshape(-1, len(trainer.task.dictionary))
        p_eval = model.decoder.output_normalizer(logits.float()).gather(-1, target[:, None])[:, 0]
    eps = cfg.criterion.eps_perplexity_epsilon
    assert eps == 1e-6  # the recipe's evaluate.eps_perplexity_epsilon reached the criterion
    zeros = int((p_eval == 0).sum())
    assert log["zero_prob_tokens"] == zeros
    if output in ("evsoftmax", "sparsemax"):
        assert zeros > 0  # the case that matters: targets with probability exactly 0
        assert log["nll_loss"] == float("inf")
    else:
        assert float(log["nll_loss"]) == pytest.approx(float(-p_eval.log().sum()), rel=1e-4)
    expected = -epsilon_log_likelihood(p_eval.log(), eps, logits.size(-1)).sum()
    assert log["eps_nll_loss"] == pytest.approx(float(expected), rel=1e-5)
    with metrics.aggregate() as agg:
        type(criterion).reduce_metrics([log])
        values = agg.get_smoothed_values()
    assert values["zero_prob"] == pytest.approx(zeros / target.numel(), abs=1e-4)
    assert values["eps_ppl"] == pytest.approx(math.exp(float(expected) / target.numel()), rel=1e-2)
    model.train()
    with torch.no_grad():
        _, _, train_log = criterion(model, sample)
    assert "eps_nll_loss" not in train_log  # training logs stay fairseq's
    if output == "evsoftmax":
        assert math.isfinite(float(train_log["nll_loss"]))  # the ε training distribution
