"""``fairseq-generate --user-dir ...`` honours where σ acts: a checkpoint of the authors'
setting (``--incremental-normalizer softmax``) decodes exactly as a checkpoint of the same
weights whose decoder self-attention is plain softmax, and differently once
``--model-overrides`` asks for σ in decoding too."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli import preprocess as fairseq_preprocess

import multimax.integrations.fairseq_plugin as plugin

SIZES = [
    "--encoder-layers", "1", "--decoder-layers", "2", "--encoder-embed-dim", "32",
    "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "4",
    "--decoder-attention-heads", "4", "--dropout", "0",
    "--attn-normalizer", "multimax", "--output-normalizer", "multimax",
]  # fmt: skip


def binarised_corpus(root: Path) -> Path:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)]
    for split, n in (("train", 40), ("valid", 8), ("test", 10)):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(n)]
        (root / f"{split}.de").write_text("\n".join(lines) + "\n")
        (root / f"{split}.en").write_text(
            "\n".join(" ".join(reversed(x.split())) for x in lines) + "\n"
        )
    argv = ["--source-lang", "de", "--target-lang", "en", "--joined-dictionary", "--workers", "1"]
    for split in ("train", "valid", "test"):
        argv += [f"--{split}pref", str(root / split)]
    argv += ["--destdir", str(root / "bin")]
    fairseq_preprocess.main(options.get_preprocessing_parser().parse_args(argv))
    return root / "bin"


def save_checkpoint(data: Path, path: Path, extra: list[str], state: dict | None = None) -> dict:
    """A fairseq checkpoint of a model built as fairseq-train builds it (``state``: its
    weights, else a fresh draw with σ pushed far from the identity)."""
    argv = [str(data), "--task", "translation", "--arch", "multimax_transformer_iwslt_de_en",
            "--user-dir", plugin.USER_DIR, *SIZES, *extra]  # fmt: skip
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(options.get_training_parser(), argv)
    )
    torch.manual_seed(0)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    if state is None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "normalizer" in name:
                    p.copy_(torch.rand(p.shape, generator=g) * 1.6 - 0.8)
        state = model.state_dict()
    checkpoint_utils.torch_persistent_save(
        {
            "cfg": cfg,
            "args": None,
            "model": state,
            "optimizer_history": [
                {
                    "criterion_name": "CrossEntropyCriterion",
                    "optimizer_name": "Adam",
                    "lr_scheduler_state": {"best": None},
                    "num_updates": 0,
                }
            ],  # fmt: skip
            "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}},
            "last_optimizer_state": None,
        },
        str(path),
    )
    return state


def generate(data: Path, checkpoint: Path, *extra: str) -> list[str]:
    """fairseq-generate's hypothesis lines (``H-<id>\\tscore\\ttokens``), sorted."""
    script = Path(sys.executable).parent / "fairseq-generate"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "fairseq_cli.generate"]
    args = [str(data), "--user-dir", plugin.USER_DIR, "--path", str(checkpoint), "--beam", "3",
            "--max-len-a", "0", "--max-len-b", "10", "--batch-size", "5",
            "--required-batch-size-multiple", "1", "--cpu", "--num-workers", "0", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hypotheses = sorted(line for line in proc.stdout.splitlines() if line.startswith("H-"))
    assert len(hypotheses) == 10
    return hypotheses


@pytest.mark.slow  # 35 s; short variant: tests/integration/test_fidelity_scope.py's beam search
def test_fairseq_generate_decodes_the_authors_setting_with_a_softmax_decoder(tmp_path):
    data = binarised_corpus(tmp_path)
    authors = ["--attn-normalizer-scope", "encoder_self,decoder_self",
               "--incremental-normalizer", "softmax"]  # fmt: skip
    state = save_checkpoint(data, tmp_path / "authors.pt", authors)
    # the same weights without σ in the decoder's self-attention (softmax there, always)
    softmax_decoder = {
        k: v
        for k, v in state.items()
        if not (k.startswith("decoder.") and ".self_attn.normalizer" in k)
    }
    assert len(softmax_decoder) == len(state) - 2 * 4
    save_checkpoint(
        data,
        tmp_path / "reference.pt",
        ["--attn-normalizer-scope", "encoder_self"],
        softmax_decoder,
    )

    as_trained = generate(data, tmp_path / "authors.pt")
    assert as_trained == generate(data, tmp_path / "reference.pt")
    with_sigma = generate(
        data, tmp_path / "authors.pt", "--model-overrides", "{'incremental_normalizer': 'same'}"
    )
    assert with_sigma != as_trained
