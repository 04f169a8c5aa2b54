"""The mechanism study's figures: error and residual mass against the held-out N, modes kept
against m, the learned σ over the raw scores, and attention rows of held-out examples."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from experiments.pipelines.mechanism.study_stats import (  # noqa: E402
    ORDER,
    cell,
    group,
    mean_std,
    normalizers_in,
)
from multimax import modulate  # noqa: E402


def save(fig, out: Path, name: str) -> None:
    fig.savefig(out / f"{name}.png", dpi=130, bbox_inches="tight")
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight")


def figures(runs: list[dict], out: Path, banner: str) -> None:
    """Every figure of the study into ``out`` (PNG and PDF); ``banner`` heads each title."""
    groups = group(runs)
    names = normalizers_in(runs)
    train_ns = sorted({r["train_n"] for r in runs})
    ms = sorted({r["m"] for r in runs})
    train_n = train_ns[0]
    colors = {m: plt.cm.viridis(i / max(len(ms) - 1, 1) * 0.85) for i, m in enumerate(ms)}

    # Error and residual mass against the held-out N, one column per normaliser.
    fig, axes = plt.subplots(
        2, len(names), figsize=(2.6 * len(names), 5.2), sharex=True, sharey="row"
    )
    axes = axes.reshape(2, len(names))
    for j, name in enumerate(names):
        for m in ms:
            rs = groups.get((name, train_n, m))
            if not rs:
                continue
            ns = rs[0]["eval_n"]
            for i, metric in enumerate(("task_error", "residual_mass")):
                stats = [mean_std(list(cell(rs, metric, n).values())) for n in ns]
                axes[i, j].errorbar(
                    ns,
                    [s[0] for s in stats],
                    yerr=[s[1] for s in stats],
                    marker="o",
                    ms=3,
                    capsize=2,
                    color=colors[m],
                    label=f"m={m}",
                )
        axes[0, j].set_title(name, fontsize=9)
        axes[1, j].set_xscale("log", base=2)
        axes[1, j].set_xlabel("N (held-out)")
        for ax in axes[:, j]:
            ax.axvline(train_n, color="0.8", lw=0.8, zorder=0)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("task error (MSE / Var y)")
    axes[1, 0].set_ylabel("residual mass")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        f"{banner}Trained at N={train_n} (grey line); mean ± std over seeds "
        f"{sorted({r['seed'] for r in runs})}",
        fontsize=10,
    )
    save(fig, out, "error_residual_vs_n")
    plt.close(fig)

    # Modes kept against m, one panel per normaliser.
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.0), sharey="row")
    axes = axes.reshape(2, len(names))
    for j, name in enumerate(names):
        for i, metric in enumerate(("modes_kept", "num_modes")):
            stats = [
                mean_std(list(cell(groups[(name, train_n, m)], metric).values()))
                for m in ms
                if (name, train_n, m) in groups
            ]
            present = [m for m in ms if (name, train_n, m) in groups]
            axes[i, j].errorbar(
                present, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3
            )
            ideal = [1.0] * len(present) if metric == "modes_kept" else present
            axes[i, j].plot(present, ideal, "k--", lw=0.8, label="ideal")
            axes[i, j].set_xticks(ms)
            axes[i, j].grid(alpha=0.3)
        axes[0, j].set_title(name, fontsize=9)
        axes[1, j].set_xlabel("m (relevant items)")
    axes[0, 0].set_ylabel("modes kept (share of relevant\nitems >= 0.5 x top relevant)")
    axes[1, 0].set_ylabel("modes in the whole row\n(p >= 0.5 x max)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{banner}At N={train_n}; mean ± std over seeds", fontsize=10)
    save(fig, out, "modes_kept_vs_m")
    plt.close(fig)

    sigma_figure(runs, out, banner)
    attention_rows_figure(runs, out, banner)


def sigma_figure(runs: list[dict], out: Path, banner: str) -> None:
    """Learned σ of trained MultiMax models next to the identity, over their raw scores."""
    mm = [n for n in ORDER if n.startswith("multimax") and any(r["normalizer"] == n for r in runs)]
    ms = sorted({r["m"] for r in runs})
    if not mm:
        return
    seed = min(r["seed"] for r in runs)
    fig, axes = plt.subplots(
        len(mm), len(ms), figsize=(3.4 * len(ms), 3.0 * len(mm)), squeeze=False
    )
    for i, name in enumerate(mm):
        for j, m in enumerate(ms):
            ax = axes[i][j]
            run = next(
                (r for r in runs if r["normalizer"] == name and r["m"] == m and r["seed"] == seed),
                None,
            )
            if run is None or run["inspect"] is None:
                ax.set_visible(False)
                continue
            ins = run["inspect"]
            rel, dis = ins["relevant_scores"], ins["distractor_scores"]
            lo, hi = min(rel + dis), max(rel + dis)
            pad = 0.15 * (hi - lo)
            x = torch.linspace(lo - pad, hi + pad, 400)
            params = ins["normalizer_parameters"]
            sigma = modulate(
                x,
                *(
                    torch.tensor(params[k])
                    for k in ("low_threshold", "high_threshold", "low_coef", "high_coef")
                ),
            )
            ax.plot(x, x, "k--", lw=0.8, label="identity")
            ax.plot(x, sigma, color="C3", lw=1.8, label="learned σ")
            ymin, ymax = ax.get_ylim()
            bins = 40
            ax2 = ax.twinx()
            ax2.hist(dis, bins=bins, color="0.6", alpha=0.5, density=True, label="distractor")
            ax2.hist(rel, bins=bins, color="C0", alpha=0.5, density=True, label="relevant")
            ax2.set_yticks([])
            ax.set_zorder(ax2.get_zorder() + 1)
            ax.patch.set_visible(False)
            for k in range(len(params["low_threshold"])):
                ax.axvline(params["low_threshold"][k], color="C2", lw=0.6, ls=":")
                ax.axvline(params["high_threshold"][k], color="C1", lw=0.6, ls=":")
            ax.set_title(f"{name}, m={m}, seed {seed}", fontsize=9)
            ax.set_xlabel("raw score q·k/√d")
            if j == 0:
                ax.set_ylabel("σ(score)")
            if i == 0 and j == 0:
                handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
                labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
                ax.legend(handles, labels, fontsize=7, loc="upper left")
    fig.suptitle(
        f"{banner}Learned σ (red) vs identity\nhistograms: held-out raw scores of relevant "
        "(blue) and distractor (grey) items; dotted: thresholds b (green), d (orange)",
        fontsize=9,
    )
    fig.tight_layout()
    save(fig, out, "sigma_learned")
    plt.close(fig)


def attention_rows_figure(runs: list[dict], out: Path, banner: str, examples: int = 3):
    """The same held-out examples' attention rows under each trained normaliser."""
    names = normalizers_in(runs)
    seed = min(r["seed"] for r in runs)
    ms = sorted({r["m"] for r in runs})
    m = 2 if 2 in ms else ms[-1]
    chosen = {
        r["normalizer"]: r["inspect"]
        for r in runs
        if r["seed"] == seed and r["m"] == m and r["inspect"] is not None
    }
    names = [n for n in names if n in chosen]
    if not names:
        return
    k = min(examples, len(chosen[names[0]]["attention"]))
    fig, axes = plt.subplots(
        k, len(names), figsize=(2.6 * len(names), 1.9 * k), sharey="row", squeeze=False
    )
    for j, name in enumerate(names):
        ins = chosen[name]
        for i in range(k):
            row = ins["attention"][i][0]  # head 0
            rel = ins["relevant"][i]
            ax = axes[i][j]
            ax.bar(
                range(len(row)),
                row,
                width=1.0,
                color=["C3" if r else "0.55" for r in rel],
            )
            ax.axhline(1.0 / m, color="k", lw=0.6, ls="--")
            residual = sum(p for p, r in zip(row, rel, strict=True) if not r)
            ax.text(
                0.98, 0.95, f"residual {residual:.2f}", transform=ax.transAxes, ha="right",
                va="top", fontsize=7,
            )  # fmt: skip
            if i == 0:
                ax.set_title(name, fontsize=9)
            if i == k - 1:
                ax.set_xlabel("item")
            if j == 0:
                ax.set_ylabel(f"example {i}\nweight")
    fig.suptitle(
        f"{banner}Attention rows on the same held-out examples (N={len(row)}, m={m}, seed "
        f"{seed}); red: relevant items, dashed: the ideal 1/m",
        fontsize=9,
    )
    fig.tight_layout()
    save(fig, out, "attention_rows")
    plt.close(fig)
