"""A trained DeiT-GAP run reloads the ways timm users load models: its checkpoint through
``timm.create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...))`` and
``checkpoint_path=``, the package's loader, and an export in timm's Hugging Face layout
through ``local-dir:``; each gives the run's logits, and the EMA weights sit where timm's
loaders look for them."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from omegaconf import OmegaConf
from timm.data import resolve_data_config
from timm.models import load_checkpoint, load_state_dict

import multimax.integrations.timm  # noqa: F401 - registers the models
from experiments.core.rundir import CHECKPOINT_LAST
from experiments.pipelines.vision.parts import RESOLVED_CONFIG, build_model
from experiments.pipelines.vision.train import train
from multimax.integrations.timm import create_model_from_checkpoint
from multimax.integrations.timm_checkpoints import EMA_KEY, read_model_card
from tests.apps import SHORT_VISION
from tests.composition import compose

ARCH = "deit_smoke_gap_patch4_16"
# not the entry point's defaults: attention MultiMax of order 1 (σ of shape (1,), so a model
# built without the recorded arguments refuses the weights), a sparse output normaliser
SETTINGS = ["normalizer=multimax", "normalizer.order=1", "model.output_normalizer=sparsemax"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch smoke run with EMA, its checkpoint, inputs and the run's own logits (model
    rebuilt from the run's config, weights read straight from the checkpoint)."""
    run_dir = tmp_path_factory.mktemp("vision_run")
    cfg = compose("vision", ["experiment=deit_tiny_imagenet", *SHORT_VISION, *SETTINGS,
                             "trainer.epochs=1"])  # fmt: skip
    train(cfg, run_dir)
    checkpoint = run_dir / CHECKPOINT_LAST
    state = torch.load(checkpoint, weights_only=True)
    reference = build_model(OmegaConf.load(run_dir / RESOLVED_CONFIG)).eval()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    logits = {}
    for key in ("model", EMA_KEY):
        weights = {k.removeprefix("module."): v for k, v in state[key].items()}
        reference.load_state_dict(weights)
        with torch.no_grad():
            logits[key] = reference(images)
    assert not torch.allclose(logits["model"], logits[EMA_KEY])  # the two are told apart
    return run_dir, checkpoint, images, logits


def logits_of(model, images):
    with torch.no_grad():
        return model.eval()(images)


def test_checkpoint_records_architecture_arguments_and_data_settings(run):
    _, checkpoint, _, _ = run
    card = read_model_card(checkpoint)
    assert card["architecture"] == ARCH
    args = card["model_args"]
    assert args["normalizer"] == "multimax" and args["normalizer_options"] == {"order": 1}
    assert args["output_normalizer"] == "sparsemax" and args["num_classes"] == 10
    assert card["pretrained_cfg"]["mean"] == (0.5, 0.5, 0.5)


def test_timm_pretrained_file_and_checkpoint_path_give_the_runs_logits(run):
    _, checkpoint, images, logits = run
    # timm's loaders take the EMA weights when there are any (their use_ema=True default)
    model = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
    torch.testing.assert_close(logits_of(model, images), logits[EMA_KEY])
    assert model.output_normalizer.registry_name == "sparsemax"
    data = resolve_data_config(model=model)
    assert data["mean"] == (0.5, 0.5, 0.5) and data["input_size"] == (3, 16, 16)

    args = read_model_card(checkpoint)["model_args"]
    model = timm.create_model(ARCH, checkpoint_path=str(checkpoint), **args)
    torch.testing.assert_close(logits_of(model, images), logits[EMA_KEY])
    load_checkpoint(model, str(checkpoint), use_ema=False)
    torch.testing.assert_close(logits_of(model, images), logits["model"])
    ema = load_state_dict(str(checkpoint), use_ema=True)
    assert set(ema) == set(model.state_dict())


def test_package_loader_gives_trained_or_ema_weights(run):
    from experiments.pipelines.vision.trained import load_trained_model

    run_dir, checkpoint, images, logits = run
    torch.testing.assert_close(
        logits_of(create_model_from_checkpoint(checkpoint), images), logits["model"]
    )
    ema = create_model_from_checkpoint(checkpoint, use_ema=True)
    torch.testing.assert_close(logits_of(ema, images), logits[EMA_KEY])
    model, _ = load_trained_model(run_dir)  # the analysis pipelines' loader is the same one
    torch.testing.assert_close(logits_of(model, images), logits["model"])


def test_export_reloads_through_timm_local_dir(run, tmp_path, capsys):
    """``scripts/export_model.py`` (its main, in process: the file answering ``--help`` as
    written is tests/e2e/test_readme.py's), EMA and trained weights alike."""
    from scripts.export_model import main as export_model

    run_dir, checkpoint, images, logits = run
    out = tmp_path / "export"
    export_model([str(run_dir), str(out)])
    assert f"(trained weights) to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == ARCH
    assert config["model_args"]["normalizer_options"] == {"order": 1}
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    torch.testing.assert_close(logits_of(model, images), logits["model"])
    assert model.output_normalizer.registry_name == "sparsemax"

    export_model([str(checkpoint), str(tmp_path / "ema"), "--ema"])
    ema = timm.create_model(f"local-dir:{tmp_path / 'ema'}", pretrained=True)
    torch.testing.assert_close(logits_of(ema, images), logits[EMA_KEY])

    with pytest.raises(SystemExit, match="not empty: choose a new folder"):
        export_model([str(run_dir), str(out)])  # an existing export is never overwritten
    assert config == json.loads((out / "config.json").read_text())


def test_pretrained_without_weights_names_the_ways_to_give_them():
    with pytest.raises(ValueError, match=r"pretrained_cfg_overlay=dict\(file=CHECKPOINT\)"):
        timm.create_model(ARCH, pretrained=True)
