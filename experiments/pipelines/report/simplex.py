"""The simplex picture: every normaliser applied to one path of 3-element scores.

The path x(θ) = r·(cos θ, cos(θ − 2π/3), cos(θ + 2π/3)) visits every ordering of three
scores: one clear winner (θ = 0, 2π/3, 4π/3) and two tied winners over a loser (θ = π/3, π,
5π/3). A normaliser that is sparse *and* multi-modal maps the tied inputs to the middle of an
edge (the loser gets exactly or nearly zero, the winners share the mass) and the clear
winners near a vertex. Softmax at a low temperature collapses towards the vertices, at a high
temperature leaks mass into the interior.

Only normalisers whose rows lie on the simplex are drawn: Scalable-Softmax (s at its initial
0.43, n = 3) and α-entmax (α = 1.25, between softmax and 1.5-entmax; at its initial 1.5 it is
1.5-entmax) join the original ones. Sigmoid attention, softpick, the sink logit and
stick-breaking give rows that need not sum to one, so they have no point on the simplex.

    python -m scripts.simplex_figure --out results/figures
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from experiments.core.io import atomic_write_text  # noqa: E402
from experiments.pipelines.report.render import to_markdown  # noqa: E402
from multimax import MultiMax, build_normalizer  # noqa: E402

RADIUS = 2.0
PANELS_PER_ROW = 5
VERTICES = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])


def score_path(n: int = 721, radius: float = RADIUS) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ, x(θ)) with x of shape (n, 3)."""
    theta = torch.linspace(0, 2 * math.pi, n)
    offsets = torch.tensor([0.0, -2 * math.pi / 3, 2 * math.pi / 3])
    return theta, radius * torch.cos(theta[:, None] + offsets)


def hand_set_multimax() -> MultiMax:
    """A first-order MultiMax with the shape the paper reports after training:
    slope t_b = 3 below b = 0 (sparser) and t_d = 0.25 above d = 1 (modes share mass)."""
    m = MultiMax(order=1)
    with torch.no_grad():
        m.low_threshold.fill_(0.0)
        m.low_coef.fill_(-2.0)  # t_b = 1 - a = 3
        m.high_threshold.fill_(1.0)
        m.high_coef.fill_(-0.75)  # t_d = 1 + c = 0.25
    return m


def panels() -> list[tuple[str, torch.nn.Module]]:
    return [
        ("softmax (T = 1)", build_normalizer("softmax")),
        ("softmax (T = 0.25)", build_normalizer("softmax", temperature=0.25)),
        ("softmax (T = 4)", build_normalizer("softmax", temperature=4.0)),
        ("sparsemax", build_normalizer("sparsemax")),
        ("1.5-entmax", build_normalizer("entmax15")),
        ("evsoftmax (eval)", build_normalizer("evsoftmax").eval()),
        ("multimax (t_b = 3, t_d = 0.25)", hand_set_multimax()),
        ("ssmax (s = 0.43, n = 3)", build_normalizer("ssmax")),
        ("α-entmax (α = 1.25)", build_normalizer("entmax_alpha", alpha_init=1.25)),
    ]


# Normalisers left out of the figure: their rows are not on the simplex.
OFF_SIMPLEX = ("sigmoid", "softpick", "softmax_sink", "stickbreaking")


def to_plane(p: torch.Tensor) -> torch.Tensor:
    """Barycentric (n, 3) -> 2-D points in the equilateral triangle."""
    return p @ VERTICES


def path_summary(p: torch.Tensor) -> tuple[float, float]:
    """Along the whole path: the mean mass on the smallest entry (leakage; 0 = sparse) and the
    share of inputs where the runner-up keeps at least half the winner's mass (two modes)."""
    top = p.sort(dim=-1, descending=True).values
    leakage = float(top[:, 2].mean())
    two_modes = float((top[:, 1] >= 0.5 * top[:, 0]).float().mean())
    return leakage, two_modes


def main(out_dir: str | Path = "results/figures") -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    theta, x = score_path()
    items = panels()
    ncols = min(len(items), PANELS_PER_ROW)
    nrows = math.ceil(len(items) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(items) :]:
        ax.set_visible(False)
    rows = []
    for ax, (title, normalizer) in zip(axes.flat, items):
        with torch.no_grad():
            p = normalizer(x)
        xy = to_plane(p)
        tri = torch.cat([VERTICES, VERTICES[:1]])
        ax.plot(tri[:, 0], tri[:, 1], color="0.3", lw=1)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=theta, cmap="twilight", s=4)
        leakage, two_modes = path_summary(p)
        rows.append([title, f"{leakage:.3f}", f"{two_modes:.2f}"])
        ties = [(theta - t).abs().argmin() for t in (math.pi / 3, math.pi, 5 * math.pi / 3)]
        ax.scatter(xy[ties, 0], xy[ties, 1], marker="x", color="crimson", s=40, zorder=3)
        ax.set_title(f"{title}\nleak {leakage:.3f}, two modes {two_modes:.0%}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 0.92)
        ax.set_xticks([])
        ax.set_yticks([])
        for i, (vx, vy) in enumerate(VERTICES.tolist()):
            ax.annotate(
                f"$e_{i + 1}$",
                (vx, vy),
                textcoords="offset points",
                xytext=(-12 if vx < 0.5 else 4, -10 if vy < 0.1 else 4),
                fontsize=8,
            )
    fig.colorbar(sc, ax=axes, shrink=0.7, label="θ along the input path")
    fig.suptitle(
        f"Each normaliser on x(θ) = {RADIUS:g}·(cos θ, cos(θ−2π/3), cos(θ+2π/3)); "
        "× = inputs with two tied winners",
        fontsize=10,
    )
    written = []
    for ext in ("png", "pdf"):
        path = out_dir / f"simplex.{ext}"
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=ext)
        tmp.replace(path)
        written.append(path)
    plt.close(fig)
    table = out_dir / "simplex.md"
    caption = (
        "Simplex picture: each normaliser applied to a closed path of 3-element scores, "
        "projected on the 2-simplex (vertices = one-hot; × = two scores tied above the third). "
        "Sparse and multi-modal means: little mass on the smallest score (the curve stays on "
        "the edges) while a large share of the path keeps two modes (the runner-up holds at "
        "least half the winner's mass) instead of collapsing to the vertices. Not drawn: "
        f"{', '.join(OFF_SIMPLEX)} (their rows need not sum to one).\n\n"
    )
    columns = ["normaliser", "mean mass on the smallest score", "share of path with two modes"]
    atomic_write_text(table, caption + to_markdown(pd.DataFrame(rows, columns=columns)) + "\n")
    written.append(table)
    return written


def cli(argv: list[str] | None = None) -> int:
    """``python -m scripts.simplex_figure [--out DIR]``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="results/figures", help="output folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    for path in main(args.out):
        print(f"wrote {path}")
    return 0
