"""The console commands ``pyproject.toml`` installs (``multimax-vision``, ``multimax-lm``,
``multimax-mt``, ...): present in the environment ``make setup`` builds, and Hydra's bash
completion for them works as a user's shell runs it (the completion script sourced by bash,
a tab simulated, the command called back for its answer)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

BIN = Path(sys.executable).parent  # the environment's bin/: where pip puts console commands


def test_every_console_command_is_installed_for_its_app():
    installed = distribution("multimax").entry_points.select(group="console_scripts")
    scripts = {entry.name: entry for entry in installed}
    assert {"multimax-vision", "multimax-lm", "multimax-mt"} <= set(scripts), (
        "run make setup (pip install -e .) after changing [project.scripts]"
    )
    for name, entry in scripts.items():
        assert (BIN / name).is_file(), name
        assert entry.module == "experiments.entry_points"
        assert callable(entry.load()), entry.value


def test_bash_completion_of_a_console_command_offers_the_config_groups(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    install = subprocess.run(["multimax-mechanism", "-sc", "install=bash"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    assert install.stdout.rstrip().endswith("hydra_bash_completion multimax-mechanism")
    tab = ('COMP_LINE="multimax-mechanism normalizer=sp"; COMP_POINT=${#COMP_LINE}; COMP_CWORD=1\n'
           'hydra_bash_completion; printf "%s\\n" "${COMPREPLY[@]}"\n')  # fmt: skip
    done = subprocess.run(["bash", "-c", install.stdout + tab], cwd=tmp_path, env=env,
                          capture_output=True, text=True)  # fmt: skip
    offered = done.stdout.split()
    assert "normalizer=sparsemax" in offered and "normalizer=softmax" not in offered, done
