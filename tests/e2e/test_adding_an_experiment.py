"""Adding an experiment is one YAML file: a copy of the config tree with one more file in
``experiment/``, and the registry, the app, the config check and the tables all know it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.core import registry
from experiments.core.io import REPO_ROOT
from experiments.core.results import RunResult
from tests.apps import app_env

NEW_EXPERIMENT = """\
# @package _global_
defaults:
  - mechanism_retrieval
  - _self_

registry:
  app: mechanism
  table: mechanism_tiny
  sweep: mechanism_tiny
  table_title: "Mechanism study, 8 items"
  table_order: 6
  metric: task_error
  metric_label: "held-out task error"
  higher_is_better: false
  also: []
  demo: null

data:
  num_items: 8
eval:
  num_items: [8, 16]
"""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("configs") / "configs"
    shutil.copytree(REPO_ROOT / "configs", root)
    (root / "experiment" / "mechanism_tiny.yaml").write_text(NEW_EXPERIMENT)
    return root


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=app_env(), capture_output=True, text=True
    )


def test_the_registry_lists_the_new_experiment_and_its_table(config_dir):
    assert registry.experiments(config_dir)["mechanism_tiny"].app == "mechanism"
    assert "mechanism_tiny" in registry.experiments_of("mechanism", config_dir)
    table = registry.tables(config_dir)["mechanism_tiny"]
    assert table.experiments == ("mechanism_tiny",) and table.sweep == "mechanism_tiny"
    assert list(registry.tables(config_dir))[-1] == "mechanism_tiny"  # table_order 6
    assert "mechanism_tiny" not in registry.experiments()  # the repository's tree is untouched


def test_the_app_runs_it_and_the_tables_show_it(config_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = run("-m", "experiments.mechanism", "--config-dir", str(config_dir),
               "experiment=mechanism_tiny", "logger=none", "train.steps=20",
               "train.log_every=10", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = RunResult.read(run_dir / "results.json")
    assert result.table == "mechanism_tiny" and result.metric_name == "task_error"
    assert result.config["data"]["num_items"] == 8

    tables = tmp_path / "tables"
    done = run("scripts/make_tables.py", str(run_dir), "--out", str(tables))
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tables / "mechanism_tiny.md").read_text()
    assert "Mechanism study, 8 items" in text and "held-out task error" in text


def test_another_app_refuses_it_and_names_the_right_one(config_dir):
    done = run("-m", "experiments.vision", "--config-dir", str(config_dir),
               "experiment=mechanism_tiny")  # fmt: skip
    assert done.returncode == 2
    assert "python -m experiments.mechanism experiment=mechanism_tiny" in done.stderr
    assert "Traceback" not in done.stderr
