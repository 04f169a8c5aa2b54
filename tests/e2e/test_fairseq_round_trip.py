"""The plugin's checkpoints through every stock fairseq tool a user reaches for, under the
pinned stack (NumPy 2): ``fairseq-eval-lm`` with every ``--sample-break-mode``,
``fairseq-generate``, ``fairseq-interactive``, and the hub interfaces
(``from_pretrained(..., user_dir=...)`` → ``translate`` / ``sample`` / ``score``) in a fresh
interpreter that never imports the plugin itself; and the ``sacrebleu`` command that
replaces ``fairseq-score --sacrebleu`` (fairseq's call does not fit sacreBLEU 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import multimax.integrations.fairseq_plugin  # noqa: F401 - provides np.compat.long
from tests.e2e.test_fairseq_plugin_cli import (
    COMMON,
    TINY_LM,
    TINY_MT,
    USER_DIR,
    fairseq,
    lm_data_bin,
    preprocess,
)

BREAK_MODES = ("none", "complete", "complete_doc", "eos")


def test_token_blocks_of_sentences_build_under_numpy_2():
    """``TokenBlockDataset(break_mode="eos")`` reads ``np.compat.long``: with the plugin
    imported it builds (fairseq-eval-lm --sample-break-mode eos, the LM hub)."""
    from fairseq.data import ListDataset, TokenBlockDataset

    sentences = [torch.tensor([4, 5, 6, 2]), torch.tensor([7, 2]), torch.tensor([8, 9, 2])]
    sizes = [len(s) for s in sentences]
    dataset = ListDataset(sentences, sizes)
    blocks = TokenBlockDataset(dataset, sizes, 8, pad=1, eos=2, break_mode="eos")
    assert [blocks[i].tolist() for i in range(len(blocks))] == [s.tolist() for s in sentences]


def test_the_documented_sacrebleu_command_scores_like_sacrebleus_corpus_bleu(tmp_path):
    import sacrebleu

    hypotheses = ["the cat sat on the mat .", "a dog ran in the park", "hello world"]
    references = ["the cat sat on a mat .", "the dog ran in the park", "hello there world"]
    (tmp_path / "hyp.txt").write_text("\n".join(hypotheses) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(references) + "\n")
    sacrebleu_cli = [sys.executable, "-m", "sacrebleu"]
    command = [*sacrebleu_cli, "ref.txt", "-i", "hyp.txt", "-m", "bleu", "-b", "-w", "4"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    expected = sacrebleu.corpus_bleu(hypotheses, [references]).score
    assert float(proc.stdout.strip()) == pytest.approx(expected, abs=0.01)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A MultiMax LM and a MultiMax translation model (2 updates each) on tiny corpora."""
    root = tmp_path_factory.mktemp("fairseq_round_trip")
    lm_data_bin(root)  # also writes the parallel corpus
    preprocess(
        root, "--source-lang", "de", "--target-lang", "en", "--joined-dictionary",
        "--trainpref", str(root / "train"), "--validpref", str(root / "valid"),
        "--testpref", str(root / "test"), "--destdir", str(root / "mt-bin"),
    )  # fmt: skip
    multimax = ["--attn-normalizer", "multimax", "--output-normalizer", "multimax",
                "--criterion", "multimax_label_smoothed_cross_entropy", "--max-update", "2",
                "--optimizer", "adam", "--lr", "1e-3", "--no-epoch-checkpoints", "--seed", "1",
                *COMMON]  # fmt: skip
    fairseq(
        "fairseq-train", "lm-bin", "--user-dir", USER_DIR, "--task",
        "multimax_language_modeling", "--arch", "multimax_transformer_lm", *TINY_LM,
        "--tokens-per-sample", "32", "--batch-size", "8", "--save-dir", "lm-ckpt", *multimax,
        cwd=root,
    )  # fmt: skip
    fairseq(
        "fairseq-train", "mt-bin", "--user-dir", USER_DIR, "--task", "multimax_translation",
        "--arch", "multimax_transformer_iwslt_de_en", *TINY_MT, "--max-tokens", "400",
        "--save-dir", "mt-ckpt", *multimax,
        cwd=root,
    )  # fmt: skip
    return root


@pytest.mark.slow  # about 2 min with the fixture's training on two busy cores
@pytest.mark.parametrize("mode", BREAK_MODES)
def test_eval_lm_every_sample_break_mode(checkpoints, mode):
    log = fairseq(
        "fairseq-eval-lm", "lm-bin", "--user-dir", USER_DIR, "--path", "lm-ckpt/checkpoint_last.pt",
        "--tokens-per-sample", "32", "--batch-size", "8", "--sample-break-mode", mode,
        "--cpu", "--num-workers", "0",
        cwd=checkpoints,
    )  # fmt: skip
    assert "Perplexity:" in log


@pytest.mark.slow
def test_generate_and_interactive(checkpoints):
    common = ["--user-dir", USER_DIR, "--path", "mt-ckpt/checkpoint_last.pt", "--beam", "2",
              "--cpu", "--max-len-a", "0", "--max-len-b", "12"]  # fmt: skip
    log = fairseq("fairseq-generate", "mt-bin", *common, "--batch-size", "6",
                  "--required-batch-size-multiple", "1", "--num-workers", "0",
                  cwd=checkpoints)  # fmt: skip
    assert len([line for line in log.splitlines() if line.startswith("H-")]) == 12
    script = os.path.join(os.path.dirname(sys.executable), "fairseq-interactive")
    proc = subprocess.run(
        [script, "mt-bin", *common, "--source-lang", "de", "--target-lang", "en"],
        input="w1 w2 w3\nw4 w5\n", cwd=checkpoints, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([line for line in proc.stdout.splitlines() if line.startswith("H-")]) == 2


HUB = """
import json, sys
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer_lm import TransformerLanguageModel

user_dir = sys.argv[1]
assert not any(m.startswith("multimax") for m in sys.modules)  # no manual import
mt = TransformerModel.from_pretrained(
    "mt-ckpt", checkpoint_file="checkpoint_last.pt", data_name_or_path="mt-bin",
    user_dir=user_dir)
lm = TransformerLanguageModel.from_pretrained(
    "lm-ckpt", checkpoint_file="checkpoint_last.pt", data_name_or_path="lm-bin",
    user_dir=user_dir)
score = lm.score("w1 w2 w3")["positional_scores"]
print(json.dumps({
    "translation": mt.translate("w1 w2 w3", beam=2),
    "sample": lm.sample("w1 w2", beam=1, sampling=True, max_len_b=4),
    "scores": score.tolist(),
    "arch": mt.cfg.model._name if hasattr(mt.cfg.model, "_name") else mt.cfg.model.arch,
}))
"""


@pytest.mark.slow
def test_hub_translate_sample_and_score_without_importing_the_plugin(checkpoints):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(HUB), USER_DIR], cwd=checkpoints,
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["translation"].strip() and out["sample"].startswith("w1 w2")
    assert len(out["scores"]) == 3 and all(s < 0 for s in out["scores"])
    assert out["arch"] == "multimax_transformer_iwslt_de_en"
