"""The plugin through fairseq's own command lines: ``fairseq-train --user-dir ...`` with
MultiMax in attention and output for a few updates on tiny corpora that the test writes and
binarises with fairseq's preprocessing, then the checkpoint reloads in ``fairseq-eval-lm`` /
``fairseq-generate`` (torch's ``weights_only=True`` default, via the plugin's allow-list).
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multimax.integrations.fairseq_plugin as plugin

USER_DIR = plugin.USER_DIR
TINY_LM = [
    "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-input-dim", "32",
    "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64",
    "--decoder-attention-heads", "4",
]  # fmt: skip
TINY_MT = [
    "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
    "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "4",
    "--decoder-attention-heads", "4",
]  # fmt: skip
COMMON = [
    "--cpu", "--num-workers", "0", "--log-format", "simple", "--log-interval", "1",
    "--required-batch-size-multiple", "1",
]  # fmt: skip


def fairseq(command: str, *args: str, cwd: Path) -> str:
    """Run a fairseq console script (``fairseq-train`` ...) of this environment; its output."""
    script = Path(sys.executable).parent / command
    module = command.removeprefix("fairseq-").replace("-", "_")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", f"fairseq_cli.{module}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{command} failed:\n{output[-4000:]}"
    return output


def write_corpus(root: Path) -> None:
    """Sentences of 3-10 words; the 'translation' reverses the sentence (attention matters)."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)]
    for split, n in (("train", 160), ("valid", 24), ("test", 12)):
        src, tgt = [], []
        for _ in range(n):
            sentence = [rng.choice(words) for _ in range(rng.randint(3, 10))]
            src.append(" ".join(sentence))
            tgt.append(" ".join(reversed(sentence)))
        (root / f"{split}.de").write_text("\n".join(src) + "\n")
        (root / f"{split}.en").write_text("\n".join(tgt) + "\n")
        (root / f"{split}.txt").write_text("\n".join(src) + "\n")


def preprocess(root: Path, *args: str) -> None:
    from fairseq import options
    from fairseq_cli import preprocess as fairseq_preprocess

    parser = options.get_preprocessing_parser()
    fairseq_preprocess.main(parser.parse_args(["--workers", "1", *args]))


def lm_data_bin(root: Path) -> Path:
    """The tiny corpus, binarised for language modelling in ``root/lm-bin``."""
    write_corpus(root)
    preprocess(
        root, "--only-source", "--trainpref", str(root / "train.txt"),
        "--validpref", str(root / "valid.txt"), "--testpref", str(root / "test.txt"),
        "--destdir", str(root / "lm-bin"),
    )  # fmt: skip
    return root / "lm-bin"


def normalizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    state = plugin.load_fairseq_checkpoint(str(path))
    return {k: v for k, v in state["model"].items() if "normalizer" in k}


def test_lm_train_multimax_then_eval_lm(tmp_path):
    lm_data_bin(tmp_path)
    log = fairseq(
        "fairseq-train", "lm-bin", "--user-dir", USER_DIR, "--task", "language_modeling",
        "--arch", "multimax_transformer_lm", *TINY_LM,
        "--attn-normalizer", "multimax", "--output-normalizer", "multimax",
        "--criterion", "multimax_label_smoothed_cross_entropy",
        "--tokens-per-sample", "32", "--batch-size", "8", "--max-update", "3",
        "--optimizer", "multimax_adam", "--weight-decay", "0.01", "--lr", "1e-3",
        "--save-dir", "ckpt", "--save-interval-updates", "1", "--keep-interval-updates", "-1",
        "--no-epoch-checkpoints", "--seed", "1", *COMMON,
        cwd=tmp_path,
    )  # fmt: skip
    assert "num_updates=3" in log.replace(" ", "") or "num_updates 3" in log
    assert re.search(r"nll_loss[ =][\d.]+", log) and "ppl" in log
    assert "multimax_adam: 12 normaliser tensors without weight decay" in log
    first, last = tmp_path / "ckpt/checkpoint_1_1.pt", tmp_path / "ckpt/checkpoint_1_3.pt"
    before, after = normalizer_tensors(first), normalizer_tensors(last)
    # 2 layers' attention + the output layer, 4 parameter vectors each
    assert len(after) == 3 * 4 and set(before) == set(after)
    for name, value in after.items():
        assert not torch.equal(value, before[name]), f"{name} did not move: no gradient"

    log = fairseq(
        "fairseq-eval-lm", "lm-bin", "--user-dir", USER_DIR, "--path", "ckpt/checkpoint_last.pt",
        "--tokens-per-sample", "32", "--batch-size", "8", "--cpu", "--num-workers", "0",
        cwd=tmp_path,
    )  # fmt: skip
    ppl = float(re.search(r"Perplexity: ([\d.]+)", log).group(1))
    assert math.isfinite(ppl) and 1 < ppl < 100


def test_translation_train_multimax_then_generate(tmp_path):
    write_corpus(tmp_path)
    preprocess(
        tmp_path, "--source-lang", "de", "--target-lang", "en", "--joined-dictionary",
        "--trainpref", str(tmp_path / "train"), "--validpref", str(tmp_path / "valid"),
        "--testpref", str(tmp_path / "test"), "--destdir", str(tmp_path / "mt-bin"),
    )  # fmt: skip
    fairseq(
        "fairseq-train", "mt-bin", "--user-dir", USER_DIR,
        "--arch", "multimax_transformer_iwslt_de_en", *TINY_MT,
        "--attn-normalizer", "multimax", "--output-normalizer", "multimax",
        "--criterion", "multimax_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", "400", "--max-update", "2", "--optimizer", "adam", "--lr", "1e-3",
        "--save-dir", "ckpt", "--no-epoch-checkpoints", "--seed", "1", *COMMON,
        cwd=tmp_path,
    )  # fmt: skip
    log = fairseq(
        "fairseq-generate", "mt-bin", "--user-dir", USER_DIR, "--path", "ckpt/checkpoint_last.pt",
        "--beam", "3", "--max-len-a", "0", "--max-len-b", "12", "--batch-size", "6",
        "--required-batch-size-multiple", "1",
        "--cpu", "--num-workers", "0",
        cwd=tmp_path,
    )  # fmt: skip
    hypotheses = [line for line in log.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == 12
    for line in hypotheses:
        score = float(line.split("\t")[1])
        assert math.isfinite(score), line
    assert "BLEU4" in log and "nan" not in log.lower().replace("nan_", "")


def score_lm(*args: str, cwd: Path) -> dict:
    """The pipelines' ``score_lm`` stage (fairseq-eval-lm's options) and its report."""
    from experiments.core.io import REPO_ROOT
    from experiments.pipelines.fairseq.worker import parse_report

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.pipelines.fairseq.worker", "score_lm", *args],
        cwd=cwd, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = dict(r for line in proc.stdout.splitlines() if (r := parse_report(line)))
    return reports["score_lm"]


@pytest.mark.slow  # 50 s; the LM apps' smoke run scores with the same stage by default
def test_test_scoring_counts_every_token_where_fairseq_eval_lm_skips_zeros(tmp_path):
    """For a softmax-family output, the pipelines' scoring equals fairseq-eval-lm's
    perplexity. For a sparse output, fairseq-eval-lm silently drops the tokens of
    probability 0 and prints a finite perplexity; the scoring counts them, reports no
    perplexity and the ε-perplexity instead."""
    lm_data_bin(tmp_path)
    eval_args = ["--user-dir", USER_DIR, "--tokens-per-sample", "32", "--batch-size", "8",
                 "--cpu", "--num-workers", "0", "--context-window", "8"]  # fmt: skip
    for output in ("multimax", "sparsemax"):
        save = f"ckpt_{output}"
        fairseq(
            "fairseq-train", "lm-bin", "--user-dir", USER_DIR, "--task", "language_modeling",
            "--arch", "multimax_transformer_lm", *TINY_LM, "--attn-normalizer", "softmax",
            "--output-normalizer", output, "--criterion", "multimax_label_smoothed_cross_entropy",
            "--tokens-per-sample", "32", "--batch-size", "8", "--max-update", "4",
            "--optimizer", "adam", "--lr", "3e-3", "--save-dir", save, "--no-epoch-checkpoints",
            "--seed", "1", *COMMON,
            cwd=tmp_path,
        )  # fmt: skip
        path = ["--path", f"{save}/checkpoint_last.pt"]
        log = fairseq("fairseq-eval-lm", "lm-bin", *path, *eval_args, cwd=tmp_path)
        fairseq_ppl = float(re.search(r"Perplexity: ([\d.]+)", log).group(1))
        ours = score_lm("lm-bin", *path, *eval_args, "--eps-perplexity-epsilon", "1e-6",
                        cwd=tmp_path)  # fmt: skip
        assert ours["epsilon"] == 1e-6 and ours["vocab"] > 30
        eps_ppl = 2 ** ours["eps_loss_base2"]
        if output == "multimax":
            assert ours["zero_prob_tokens"] == 0
            assert 2 ** ours["loss_base2"] == pytest.approx(fairseq_ppl, abs=0.006)
            assert eps_ppl == pytest.approx(fairseq_ppl, rel=1e-3)  # no zeros: ε barely matters
        else:
            assert ours["zero_prob_tokens"] > 0 and ours["loss_base2"] is None
            assert math.isfinite(fairseq_ppl)  # fairseq's number silently left tokens out
            assert math.isfinite(eps_ppl) and eps_ppl > fairseq_ppl
