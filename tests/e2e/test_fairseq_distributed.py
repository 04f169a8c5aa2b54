"""fairseq's own distributed training of the plugin's LM and MT with two CPU processes (gloo):
under torchrun (the app itself) and under fairseq's own process spawning. Two ranks must give
the losses of one process with ``--update-freq 2``, keep σ identical on every rank, and a kill
of one rank must end the whole job, after which the same command resumes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from experiments.core.io import REPO_ROOT
from experiments.core.results import read_results
from experiments.pipelines.fairseq import commands, run
from experiments.pipelines.fairseq.progress import train_losses
from tests.apps import TINY_LM, TINY_MT, Background, app_env, run_app, wait_dead
from tests.composition import compose

PROBE = str(Path(__file__).with_name("fairseq_rank_probe.py"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Dropout off: two ranks draw their dropout masks from the same seed where one process with
# --update-freq 2 continues one stream; everything else is the same computation.
PIPELINES = {
    "lm": ("language_model", [*TINY_LM, "normalizer=multimax", "train.max_update=16",
                              "train.save_interval_updates=6", "train.log_interval=1"]),
    "mt": ("translation", [*TINY_MT, "normalizer=multimax", "train.max_update=10",
                           "train.save_interval_updates=5", "train.log_interval=1",
                           "model.args.dropout=0.0"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The tiny smoke corpora, prepared once (ranks must not race to prepare them)."""
    root = tmp_path_factory.mktemp("data")
    for app, overrides in PIPELINES.values():
        cfg = compose(app, [*overrides, f"data.root={root}"])
        run.ensure_data(cfg)
    return root


def _train_args(app: str, overrides: list[str], save_dir: Path) -> list[str]:
    cfg = compose(app, overrides)
    return commands.train_args(cfg, save_dir, cuda=False)


@pytest.mark.parametrize("pipeline", ["lm", pytest.param("mt", marks=pytest.mark.slow)])
def test_fairseq_spawned_ranks_equal_one_process_and_keep_sigma_identical(
    pipeline, data_root, tmp_path
):
    """fairseq's own launcher spawns two CPU workers (it spawns one per GPU; the probe stands
    in two GPUs): the same per-update losses as one process with --update-freq 2, and after
    every update each rank holds exactly the same σ."""
    app, overrides = PIPELINES[pipeline]
    overrides = [*overrides, f"data.root={data_root}"]
    runs = {}
    for name, extra, probe in (
        ("two_ranks", ["distributed.world_size=2", "train.update_freq=1"], ["--stand-in-gpus", "2"]),
        ("one_process", ["distributed.world_size=1", "train.update_freq=2"], []),
    ):  # fmt: skip
        out = tmp_path / name
        out.mkdir()
        args = _train_args(app, [*overrides, *extra], out / "checkpoints")
        if name == "two_ranks":
            assert "--distributed-world-size 2 --distributed-backend gloo" in " ".join(args)
        bg = Background([sys.executable, PROBE, *probe, *args],
                        env=app_env(PROBE_OUT=str(out), PYTHONPATH=str(REPO_ROOT)))  # fmt: skip
        code = bg.finish()
        assert code == 0, bg.output[-4000:]
        (out / "train.log").write_text(bg.output)
        runs[name] = out
    one = train_losses(runs["one_process"] / "train.log")
    two = train_losses(runs["two_ranks"] / "train.log")
    assert two.keys() == one.keys() and len(one) >= 10
    for update in one:
        assert two[update] == pytest.approx(one[update], abs=2e-3), update
    rank0 = torch.load(runs["two_ranks"] / "sigma_rank0.pt")
    rank1 = torch.load(runs["two_ranks"] / "sigma_rank1.pt")
    single = torch.load(runs["one_process"] / "sigma_rank0.pt")
    assert rank0.keys() == rank1.keys() == single.keys() and len(rank0) >= 8
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(rank0[name], single[name], atol=1e-5, rtol=1e-4)


def _ranks(torchrun: Background) -> dict[int, int]:
    """{rank: pid} of the app processes torchrun started."""
    ranks = {}
    for pid in torchrun.children():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        path = Path(f"/proc/{p}/task/{p}/children")
        kids = [int(c) for c in path.read_text().split()] if path.exists() else []
        out += kids
        todo += kids
    return out


@pytest.mark.slow  # 80 s; the spawned-ranks test above is its short variant
def test_torchrun_two_processes_equal_one_kill_of_a_rank_ends_the_job_and_resumes(
    data_root, tmp_path
):
    """The app under torchrun with 2 CPU ranks: the same losses and test perplexity as one
    process with --update-freq 2. Killing one rank's app after a checkpoint ends the whole
    job (no process left, a message saying what happened); the same torchrun command then
    resumes and ends on the uninterrupted number."""
    app, overrides = PIPELINES["lm"]
    overrides = [*overrides, f"data.root={data_root}"]
    single = tmp_path / "single"
    proc = run_app(app, [*overrides, "train.update_freq=2", f"hydra.run.dir={single}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ddp = tmp_path / "ddp"
    command = [*TORCHRUN, "-m", f"experiments.{app}", *overrides, "train.update_freq=1",
               f"hydra.run.dir={ddp}"]  # fmt: skip
    torchrun = Background(command)
    torchrun.wait_for("checkpoint saved @ update 6")
    ranks = _ranks(torchrun)
    assert sorted(ranks) == [0, 1]
    everything = _descendants(torchrun.proc.pid)
    os.kill(ranks[1], signal.SIGKILL)
    code = torchrun.finish()
    assert code != 0
    assert wait_dead(everything, timeout=60) == [], "processes outlived the killed rank"
    assert "exitcode" in torchrun.output and "-9" in torchrun.output  # torchrun's own report
    assert not (ddp / "results.json").exists()

    resumed = Background(command)
    assert resumed.finish() == 0, resumed.output[-4000:]
    assert "resumed from" in resumed.output
    one, two = read_results(single / "results.json"), read_results(ddp / "results.json")
    assert two.steps == one.steps == 16
    assert f"{two.metric_value:.2f}" == f"{one.metric_value:.2f}"
    losses_one, losses_two = train_losses(single / "train.log"), train_losses(ddp / "train.log")
    assert losses_two.keys() == losses_one.keys()
    for update, loss in losses_one.items():
        assert losses_two[update] == pytest.approx(loss, abs=2e-3), update
