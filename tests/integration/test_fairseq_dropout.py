"""Monte Carlo dropout at generation (``fairseq-generate --retain-dropout
--retain-dropout-modules NAMES``): fairseq's stock class names select the same dropout modules
in the plugin's models as in fairseq's own, and generation then samples.

Models and the generation config are parsed and built with fairseq's own ``options`` /
``tasks`` at tiny sizes; ``model.prepare_for_inference_(cfg)`` is the call fairseq-generate
makes on every loaded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fairseq import options, tasks
from fairseq.data import data_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.modules import FairseqDropout

import multimax.integrations.fairseq_plugin as plugin

WORDS = [f"w{i}" for i in range(40)]
DROPOUT = ["--dropout", "0.3", "--attention-dropout", "0.2", "--activation-dropout", "0.1"]
MT = [
    "--task", "translation", "-s", "de", "-t", "en",
    "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32",
    "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "4",
    "--decoder-attention-heads", "4",
]  # fmt: skip
LM = [
    "--task", "language_modeling", "--decoder-layers", "2", "--decoder-embed-dim", "32",
    "--decoder-input-dim", "32", "--decoder-output-dim", "32",
    "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4",
    "--tokens-per-sample", "32",
]  # fmt: skip
# every name fairseq's stock transformer gives its FairseqDropout modules
STOCK_NAMES = [
    "TransformerEncoder",
    "TransformerDecoder",
    "TransformerEncoderLayerBase",
    "TransformerDecoderLayerBase",
    "MultiheadAttention",
]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for name in ("dict.txt", "dict.de.txt", "dict.en.txt"):
        (tmp_path / name).write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(WORDS)))
    return tmp_path


def build(data: Path, arch: str, sizes: list[str], normalizer: str = "softmax"):
    """(model, task) parsed and built as fairseq-train does."""
    extra = [] if not arch.startswith("multimax_") else ["--attn-normalizer", normalizer]
    argv = [str(data), "--arch", arch, "--user-dir", plugin.USER_DIR, *sizes, *DROPOUT, *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    return task.build_model(cfg.model), task


def generation_cfg(data: Path, task: str, modules: list[str] | None):
    """fairseq-generate's config for ``--retain-dropout [--retain-dropout-modules LIST]``,
    the list written as fairseq's docs write it: '["TransformerEncoder", ...]'."""
    argv = [str(data), "--path", "unused.pt", "--task", task, "--retain-dropout"]
    if task == "translation":
        argv += ["-s", "de", "-t", "en"]
    if modules is not None:
        argv += ["--retain-dropout-modules", json.dumps(modules)]
    args = options.parse_args_and_arch(options.get_generation_parser(), argv)
    return convert_namespace_to_omegaconf(args)


def retained(model: torch.nn.Module) -> set[str]:
    """Paths of the dropout modules that stay active in eval mode."""
    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, FairseqDropout) and m.apply_during_inference and m.p > 0
    }


DECODER_NAMES = [n for n in STOCK_NAMES if "Encoder" not in n]
MT_CASES = [[name] for name in STOCK_NAMES] + [STOCK_NAMES[:2], STOCK_NAMES, None]
LM_CASES = [[name] for name in DECODER_NAMES] + [DECODER_NAMES, STOCK_NAMES, None]
CASES = [("transformer_iwslt_de_en", MT, m) for m in MT_CASES] + [
    ("transformer_lm", LM, m) for m in LM_CASES
]


def case_id(case) -> str:
    arch, _, modules = case
    return f"{arch}:{'all' if modules is None else '+'.join(modules)}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_stock_names_retain_the_same_dropout_modules(data, case):
    stock_arch, sizes, modules = case
    cfg = generation_cfg(data, sizes[1], modules)
    stock, _ = build(data, stock_arch, sizes)
    ours, _ = build(data, f"multimax_{stock_arch}", sizes, normalizer="multimax")
    for model in (stock, ours):
        model.prepare_for_inference_(cfg)
    assert retained(stock)  # the names select something in fairseq's own model
    assert retained(ours) == retained(stock)


def test_retained_dropout_makes_generation_stochastic(data):
    cfg = generation_cfg(data, "translation", ["TransformerEncoder", "TransformerDecoderLayerBase"])
    cfg.generation.beam = 2
    cfg.generation.max_len_b = 6
    model, task = build(data, "multimax_transformer_iwslt_de_en", MT, normalizer="multimax")
    model.eval()
    g = torch.Generator().manual_seed(1)
    first = task.source_dictionary.nspecial
    rows = [torch.cat([torch.randint(first, len(WORDS), (n,), generator=g), torch.tensor([2])])
            for n in (7, 4, 5)]  # fmt: skip
    src = data_utils.collate_tokens(rows, task.source_dictionary.pad(), left_pad=True)
    sample = {
        "id": torch.arange(src.size(0)),
        "net_input": {
            "src_tokens": src,
            "src_lengths": src.ne(task.source_dictionary.pad()).sum(1),
        },
    }

    def scores() -> torch.Tensor:
        generator = task.build_generator([model], cfg.generation)
        with torch.no_grad():
            hypos = task.inference_step(generator, [model], sample)
        return torch.stack([sentence[0]["score"] for sentence in hypos])

    deterministic = scores()
    assert torch.equal(scores(), deterministic)  # eval mode: no dropout yet
    model.prepare_for_inference_(cfg)
    sampled = [scores() for _ in range(3)]
    assert any(not torch.equal(s, deterministic) for s in sampled)
