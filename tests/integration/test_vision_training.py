"""The vision pipeline in-process on the real digits: configs compose, clear data errors,
resume after a stop gives the run an uninterrupted one gives, NaN stops, the dry run, and
the analysis hooks."""

from __future__ import annotations

import json

import pytest
import torch

import multimax
from experiments.core.io import REPO_ROOT
from experiments.core.results import METRICS_LOG
from experiments.core.rundir import (
    CHECKPOINT_LAST,
    CHECKPOINT_PREVIOUS,
    CLOCK_FILE,
    load_checkpoint,
)
from experiments.core.setup import normalizer_options
from experiments.pipelines.vision.data import DataLayoutError, ResumableSampler, ensure_data
from experiments.pipelines.vision.train import NonFiniteLoss, dry_run, train
from tests.apps import SHORT_VISION as SHORT
from tests.composition import compose

EXPERIMENTS = ["deit_tiny_imagenet", "deit_small_imagenet"]
NORMALIZERS = sorted(p.stem for p in (REPO_ROOT / "configs" / "normalizer").glob("*.yaml"))


def cfg_for(*overrides: str, experiment: str = "deit_tiny_imagenet"):
    return compose("vision", [f"experiment={experiment}", *overrides])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_every_normalizer(experiment):
    for normalizer in NORMALIZERS:
        for profile in ("paper", "smoke"):
            cfg = compose(
                "vision",
                [f"experiment={experiment}", f"normalizer={normalizer}", f"profile={profile}"],
            )
            assert cfg.task == "image_classification"
            assert cfg.model.output_normalizer == cfg.normalizer.name
            assert cfg.profile.name == profile
            if profile == "paper":
                assert cfg.data.name == "imagenet" and cfg.trainer.epochs == 300
                assert cfg.trainer.batch_size == 1024 and cfg.augment.mixup == 0.8
                assert cfg.model.name == experiment.replace("_imagenet", "_gap_patch16_224")
            else:
                assert cfg.data.name == "digits"
                assert cfg.model.name == "deit_smoke_gap_patch4_16"


def test_output_normalizer_is_one_override():
    cfg = cfg_for("normalizer=multimax", "normalizer.order=1", "model.output_normalizer=softmax")
    assert normalizer_options(cfg, "attention") == ("multimax", {"order": 1})
    assert normalizer_options(cfg, "output") == ("softmax", {})
    assert cfg_for("experiment=deit_small_imagenet").model.drop_path == 0.1


def test_missing_data_root_names_layout_and_preparing_command(tmp_path):
    cfg = cfg_for(f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(DataLayoutError, match=r"(?s)<split>/<class>/<image>.*prepare_imagenet"):
        ensure_data(cfg)
    (tmp_path / "bad" / "train").mkdir(parents=True)
    (tmp_path / "bad" / "val").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match="no class folders"):
        ensure_data(cfg_for(f"data.root={tmp_path / 'bad'}"))


def test_prepare_digits_writes_the_real_digits_once(tmp_path):
    from experiments.pipelines.vision.digits import write_digits

    root = write_digits(tmp_path / "digits")
    train = sorted((root / "train").glob("*/*.png"))
    val = sorted((root / "val").glob("*/*.png"))
    assert (len(train), len(val)) == (1437, 360)
    assert sorted(p.name for p in (root / "val").iterdir()) == [str(d) for d in range(10)]
    stamp = train[0].stat().st_mtime_ns
    write_digits(root)
    assert train[0].stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_resumable_sampler_continues_the_epoch_order():
    base = torch.utils.data.DistributedSampler(range(50), num_replicas=1, rank=0, seed=3)
    sampler = ResumableSampler(base)
    sampler.start(epoch=2)
    full = list(sampler)
    sampler.start(epoch=2, skip=20)
    assert list(sampler) == full[20:]
    sampler.start(epoch=3)
    assert list(sampler) != full


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = train(cfg_for(*SHORT, "normalizer=multimax"), run_dir)
    return run_dir, result


def test_smoke_run_writes_results(uninterrupted):
    run_dir, result = uninterrupted
    data = json.loads((run_dir / "results.json").read_text())
    assert data["task"] == "image_classification" and data["dataset"] == "digits"
    assert data["metric_name"] == "top1" and data["steps"] == 22
    assert data["normalizer"] == data["output_normalizer"] == "multimax"
    assert data["config"]["trainer"]["epochs"] == 2
    assert data["metric_value"] == pytest.approx(result.metric_value)
    lines = [json.loads(x) for x in (run_dir / METRICS_LOG).read_text().splitlines()]
    assert any("throughput" in x for x in lines) and any("val/top1" in x for x in lines)


def test_stopped_and_resumed_run_ends_like_an_uninterrupted_one(uninterrupted, tmp_path, capsys):
    _, expected = uninterrupted
    cfg = cfg_for(*SHORT, "normalizer=multimax", "trainer.stop_after_steps=15")
    assert train(cfg, tmp_path) is None  # stopped mid-epoch 2, after a checkpoint
    assert load_checkpoint(tmp_path)["step"] == 15
    assert "rerun the same command to resume" in capsys.readouterr().out
    resumed = train(cfg, tmp_path)  # the same command again: resumes and finishes
    assert "resuming from" in capsys.readouterr().out
    assert resumed.steps == expected.steps == 22
    assert resumed.metrics["top1"] == pytest.approx(expected.metrics["top1"], abs=1e-9)
    assert resumed.metrics["val_loss"] == pytest.approx(expected.metrics["val_loss"], rel=1e-5)
    assert resumed.metrics["ema_val_loss"] == pytest.approx(
        expected.metrics["ema_val_loss"], rel=1e-5
    )


def test_rerun_of_a_finished_run_changes_nothing(uninterrupted, tmp_path, capsys):
    import shutil

    run_dir, expected = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    files = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    again = train(cfg_for(*SHORT, "normalizer=multimax"), copy)
    assert "holds a finished run" in capsys.readouterr().out
    assert again.metric_value == expected.metric_value and again.steps == expected.steps
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == files


def test_wall_seconds_add_up_across_resumes(tmp_path):
    cfg = cfg_for(*SHORT, "normalizer=softmax", "trainer.stop_after_steps=15")
    assert train(cfg, tmp_path) is None
    first = json.loads((tmp_path / CLOCK_FILE).read_text())["seconds"]
    assert first > 0
    resumed = train(cfg, tmp_path)
    assert resumed.wall_seconds > first  # the first segment counted, not just the last
    assert json.loads((tmp_path / "results.json").read_text())["wall_seconds"] > first


def test_unreadable_checkpoints_start_over_with_a_line_and_a_clean_curve(tmp_path, capsys):
    cfg = cfg_for(*SHORT, "normalizer=softmax", "trainer.stop_after_steps=10")
    assert train(cfg, tmp_path) is None
    for name in (CHECKPOINT_LAST, CHECKPOINT_PREVIOUS):
        if (tmp_path / name).exists():
            (tmp_path / name).write_bytes(b"garbage")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="unreadable"):
        assert train(cfg, tmp_path) is None
    assert "no readable checkpoint" in capsys.readouterr().out
    steps = [json.loads(x)["step"] for x in (tmp_path / METRICS_LOG).read_text().splitlines()]
    assert steps.count(5) == 1  # the curve of the abandoned start is gone


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = cfg_for(*SHORT, "trainer.checkpoint_every_steps=2", "trainer.inject_nan_at_step=3")
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        train(cfg, tmp_path)
    assert load_checkpoint(tmp_path)["step"] == 2
    assert not (tmp_path / "results.json").exists()


def test_load_trained_model_and_evaluation_batches(uninterrupted):
    from experiments.pipelines.vision.trained import evaluation_batches, load_trained_model

    run_dir, result = uninterrupted
    model, cfg = load_trained_model(run_dir)
    assert cfg.model.name == "deit_smoke_gap_patch4_16" and not model.training
    batches = list(evaluation_batches(cfg, num_batches=2, batch_size=8))
    assert len(batches) == 2 and batches[0][0].shape == (8, 3, 16, 16)
    with torch.no_grad(), multimax.record_attention() as weights:
        model(batches[0][0])
    assert len(weights) == 4
    ema_model, _ = load_trained_model(run_dir, use_ema=True)
    assert not torch.equal(ema_model.head.weight, model.head.weight)


def test_dry_run_of_the_paper_profile_on_the_cpu(tmp_path, capsys):
    cfg = cfg_for(
        "logger=none",
        f"data.root={tmp_path / 'no_imagenet'}",
        "dry_run=true",
        "trainer.dry_run_cpu_batch=2",
        experiment="deit_small_imagenet",
    )
    text = dry_run(cfg)
    out = capsys.readouterr().out
    assert "random images of the real shapes" in out
    assert "parameters:        22,0" in text  # DeiT-small + 8·13 σ scalars
    assert "images per step:  1,024 (world size 8)" in text
    assert "full schedule:     375,300 steps" in text  # 300 x floor(1,281,167 / 1,024)


def test_a_single_launcher_process_starts_one_worker_per_process_wanted(monkeypatch, tmp_path):
    from experiments.pipelines.vision.launch import worker_command

    for name in (
        "RANK",
        "LOCAL_RANK",
        "TORCHELASTIC_RUN_ID",
        "SLURM_JOB_NUM_NODES",
        "SLURM_NNODES",
    ):
        monkeypatch.delenv(name, raising=False)
    overrides = ["experiment=deit_small_imagenet", "hydra.run.dir=elsewhere", "seed=1"]
    cpu_only = cfg_for("trainer.procs_per_node=1")
    assert worker_command(cpu_only, overrides, tmp_path) is None
    cmd = worker_command(cfg_for("trainer.procs_per_node=2"), overrides, tmp_path)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    assert cmd[-4:] == [
        "experiments.vision",
        "experiment=deit_small_imagenet",
        "seed=1",
        f"hydra.run.dir={tmp_path}",
    ]
    monkeypatch.setenv("LOCAL_RANK", "0")  # already a torchrun worker: train here
    assert worker_command(cfg_for("trainer.procs_per_node=2"), overrides, tmp_path) is None


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path):
    _, expected = uninterrupted
    cfg = cfg_for(*SHORT, "normalizer=multimax", "trainer.stop_after_steps=15")
    train(cfg, tmp_path)  # checkpoints at step 11 (epoch end) and 15 (the stop)
    (tmp_path / CHECKPOINT_LAST).write_bytes(b"truncated by a crash")
    with (tmp_path / METRICS_LOG).open("a") as log:
        log.write('{"step": 16, "train_lo')  # a line the crash cut short
    with pytest.warns(UserWarning, match="unreadable"):
        resumed = train(cfg_for(*SHORT, "normalizer=multimax"), tmp_path)
    assert resumed.steps == 22
    assert resumed.metrics["top1"] == pytest.approx(expected.metrics["top1"], abs=1e-9)
    steps = [json.loads(x)["step"] for x in (tmp_path / METRICS_LOG).read_text().splitlines()]
    assert steps == sorted(steps)  # lines after step 11 were dropped, then rewritten once


# --- data errors name the file and the fix ---------------------------------


def test_a_data_root_holding_other_files_is_refused_and_left_alone(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("not an image tree\n")
    with pytest.raises(DataLayoutError, match=r"notes\.txt.*a missing or empty folder"):
        ensure_data(cfg_for("profile=smoke", f"data.root={root}"))
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temp tree left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ensure_data(cfg_for("profile=smoke", f"data.root={empty}")) == empty
    assert (empty / "train").is_dir()


def test_unreadable_images_are_named_once_and_refused_or_left_out(damaged_digits, monkeypatch):
    from experiments.pipelines.vision import data as vision_data
    from experiments.pipelines.vision.data import BadImagesError, build_datasets

    root, cut, junk = damaged_digits
    with pytest.raises(BadImagesError) as refused:
        build_datasets(cfg_for("profile=smoke", f"data.root={root}"))
    message = str(refused.value)
    assert f"2 image(s) of {root / 'train'} cannot be read" in message
    assert f"{cut} (Truncated File Read)" in message and f"{junk} (cannot identify" in message
    assert "data.bad_images=skip" in message and "\n" not in message

    def no_second_look(path):
        raise AssertionError(f"{path} checked again")

    monkeypatch.setattr(vision_data, "image_problem", no_second_look)  # the check is remembered
    train, val = build_datasets(
        cfg_for("profile=smoke", f"data.root={root}", "data.bad_images=skip")
    )
    assert (len(train), len(val)) == (1437 - 2, 360)
    assert str(cut) not in {str(p) for p, _ in train.reader.samples}
