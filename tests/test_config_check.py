"""A newcomer's mistakes end in one line before any work starts (issue 12): bad values and
keys no code reads are refused naming the key, the value, what is allowed and the fix
(points 5, 6); a stopped run prints the command that resumes it (8); the default output is
the project's own lines (9); no test waits on a fixed timeout (10)."""

from __future__ import annotations

import ast
import io
import logging
import os
import shlex
import sys
import warnings

import pytest
import tomllib
from apps import TINY_LM, app_env, run, run_app
from composition import compose

from experiments.core.console import VERBOSE_ENV, configure_output, verbose
from experiments.core.errors import USAGE_EXIT_CODE
from experiments.core.io import REPO_ROOT
from experiments.core.rundir import resume_hint

REPO = REPO_ROOT
PROFILES = ("paper", "smoke")
NORMALIZERS = sorted(p.stem for p in (REPO / "configs" / "normalizer").glob("*.yaml"))


# The apps of INTERFACES.md (config_check is imported inside each test: one fails at a time).
APPS = ("vision", "language_model", "translation", "mechanism", "benchmark")


def problems(app: str, overrides: list[str], fairseq_check: bool = False) -> list[str]:
    from experiments.config import check as config_check

    cfg = compose(app, overrides, hydra=True)
    return config_check.problems(cfg, app, cfg.hydra.runtime.choices, fairseq_check)


# --- what ships is accepted -------------------------------------------------------------------


@pytest.mark.parametrize("app", APPS)
def test_every_shipped_experiment_profile_and_normalizer_passes(app):
    from experiments.config import check as config_check

    experiments = config_check.APPS[app].experiments or (None,)
    for experiment in experiments:
        for profile in PROFILES:
            for normalizer in NORMALIZERS:
                overrides = [f"profile={profile}", f"normalizer={normalizer}"]
                overrides += [f"experiment={experiment}"] if experiment else []
                assert problems(app, overrides) == [], overrides


def test_every_experiment_data_and_model_file_belongs_to_one_app():
    from experiments.config import check as config_check

    for group in ("experiment", "data", "model"):
        for path in sorted((REPO / "configs" / group).glob("*.yaml")):
            owners = [
                spec.name
                for spec in config_check.APPS.values()
                if path.stem in (spec.experiments if group == "experiment" else
                                 spec.options.get(group, ()))
            ]  # fmt: skip
            assert len(owners) == 1, f"{group}/{path.name} belongs to {owners or 'no app'}"


def test_every_rule_is_about_a_declared_key():
    """No dead rules: an app's own rules name keys its files declare (passthrough and
    wildcard keys aside); a shared rule names a key some app declares."""
    from experiments.config import check as config_check

    for app, rules in config_check.RULES.items():
        declared = config_check.declared_keys(app)
        passthrough = config_check.APPS[app].passthrough
        for key in rules:
            if "*" in key or any(key.startswith(p + ".") for p in passthrough):
                continue
            if key not in config_check.SHARED_RULES:
                assert key in declared, f"{app}: a rule for {key}, which no file declares"
    for key in config_check.SHARED_RULES:
        assert any(key in config_check.declared_keys(app) for app in config_check.APPS), key


def test_shipped_fairseq_options_are_options_fairseq_knows():
    """The fairseq options of every LM / MT experiment and profile, parsed by fairseq's own
    parsers (the check trusts declared keys, so they must be right)."""
    from experiments.config import check as config_check
    from experiments.pipelines.fairseq import run as fairseq_run

    lines = []
    for app in ("language_model", "translation"):
        for experiment in config_check.APPS[app].experiments:
            for profile in PROFILES:
                cfg = compose(app, [f"experiment={experiment}", f"profile={profile}"])
                lines += fairseq_run.check_command_lines(cfg)
    found = fairseq_run.parse_with_fairseq(lines)
    assert len(found) == len(lines)
    assert [error for _, error in found if error] == []


# --- point 5: bad values, named with what is allowed and a fix --------------------------------

BAD_VALUES = [
    ("vision", ["profile=smoke", "trainer.epochs=0"],
     ["trainer.epochs=0: expected an integer >= 1", "e.g. trainer.epochs=300"]),
    ("vision", ["profile=smoke", "optim.lr_base=-0.003"],
     ["optim.lr_base=-0.003: expected a number > 0"]),
    ("vision", ["model.output_normalizer=sparsmax"],
     ["model.output_normalizer=sparsmax: expected one of softmax,", "did you mean sparsemax?"]),
    ("vision", ["trainer.amp=fp16"], ["trainer.amp=fp16: expected one of auto, bfloat16"]),
    ("vision", ["experiment=lm_wikitext103"],
     ["experiment=lm_wikitext103: not one of experiments.vision's",
      "python -m experiments.language_model experiment=lm_wikitext103"]),
    ("vision", ["data=wikitext103"], ["data=wikitext103: not one of experiments.vision's"]),
    ("translation", ["normalizer.order=abc"], ["normalizer.order=abc: expected an integer >= 1"]),
    ("translation", ["normalizer.order=0"], ["normalizer.order=0: expected an integer >= 1"]),
    ("translation", ["train.precision=fp8"], ["train.precision=fp8: expected one of fp32"]),
    ("translation", ["train.max_tokens=many"], ["train.max_tokens=many: expected an integer"]),
    ("language_model", ["train.lr=-1"], ["train.lr=-1: expected a number > 0"]),
    ("language_model", ["train.max_update=-5"], ["train.max_update=-5: expected an integer >= 1"]),
    ("language_model", ["evaluate.args.context_window=512"],
     ["evaluate.args.context_window=512: must be smaller than evaluate.args.tokens_per_sample"]),
    ("mechanism", ["train.steps=0"], ["train.steps=0: expected an integer >= 1"]),
    ("mechanism", ["data.num_relevant=100"], ["data.num_relevant=100: must be <= data.num_items"]),
    ("benchmark", ["repeats=0"], ["repeats=0: expected an integer >= 1"]),
]  # fmt: skip


@pytest.mark.parametrize(("app", "overrides", "expected"), BAD_VALUES)
def test_a_bad_value_is_one_line_naming_key_value_allowed_and_fix(app, overrides, expected):
    found = problems(app, overrides)
    assert len(found) == 1, found
    assert "\n" not in found[0]
    for text in expected:
        assert text in found[0]


# --- point 6: a key no code reads ---------------------------------------------------------------

UNKNOWN_KEYS = [
    ("vision", ["+optim.lr=1e6"], "optim.lr=1000000.0: experiments.vision has no setting optim.lr",
     "did you mean optim.lr_base?"),
    ("vision", ["+trainer.epoch=3"], "trainer.epoch=3: experiments.vision has no setting",
     "did you mean trainer.epochs?"),
    ("language_model", ["+evaluate.metrics=ppl"], "evaluate.metrics=ppl: experiments.language_model",
     "did you mean evaluate.metric?"),
    ("mechanism", ["+train.step=5"], "train.step=5: experiments.mechanism has no setting",
     "did you mean train.steps?"),
    ("benchmark", ["+repeat=3"], "repeat=3: experiments.benchmark has no setting repeat",
     "did you mean repeats?"),
]  # fmt: skip


@pytest.mark.parametrize(("app", "overrides", "start", "hint"), UNKNOWN_KEYS)
def test_a_key_no_code_reads_is_refused(app, overrides, start, hint):
    found = problems(app, overrides)
    assert len(found) == 1 and found[0].startswith(start) and hint in found[0], found
    assert "nothing would read it" in found[0]


def test_fairseq_options_no_config_file_declares_are_asked_of_fairseq():
    """``+train.NAME=...`` is handed to fairseq-train: fairseq's parser decides, before the
    run starts (a real option passes, an unknown one is refused naming the key)."""
    assert problems("language_model", ["+train.max_epoch=2"], fairseq_check=True) == []
    found = problems("translation", ["+train.max_epochs=2"], fairseq_check=True)
    assert len(found) == 1 and found[0].startswith("train.max_epochs: fairseq-train has no option")
    found = problems("language_model", ["model.arch=transformer_lm"], fairseq_check=True)
    assert found and "use model.arch=multimax_transformer_lm" in found[0]


def test_a_sweep_is_checked_point_by_point():
    from experiments.config import check as config_check

    points = config_check.sweep_points(["normalizer=softmax,multimax", "seed=0,1", "logger=none"])
    assert len(points) == 4 and ["normalizer=multimax", "seed=1", "logger=none"] in points


# --- the apps as a user runs them ---------------------------------------------------------------

APP_CASES = [
    ("vision", ["experiment=deit_tiny_imagenet", "profile=smoke", "trainer.epochs=0"]),
    ("vision", ["+optim.lr=1e6"]),
    ("translation", ["experiment=mt_iwslt14_deen", "profile=smoke", "normalizer.order=abc"]),
    ("language_model", ["experiment=lm_wikitext103", "profile=smoke", "train.lr=-1"]),
    ("mechanism", ["experiment=mechanism_retrieval", "profile=smoke", "train.steps=0"]),
]


@pytest.mark.parametrize(("app", "overrides"), APP_CASES)
def test_the_app_stops_in_one_line_and_writes_nothing(app, overrides, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(app, [*overrides, "logger=none", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == USAGE_EXIT_CODE, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), lines
    assert not run_dir.exists()  # no .hydra/, config, log, W&B run or checkpoints/


def test_a_refused_rerun_leaves_an_existing_run_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("the first start's config\n")
    (run_dir / "results.json").write_text("{}\n")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_app("mechanism", ["train.steps=0", "logger=none", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == USAGE_EXIT_CODE
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_hydra_full_error_shows_the_traceback_too(tmp_path):
    proc = run_app(
        "mechanism",
        ["train.steps=0", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        env=app_env(HYDRA_FULL_ERROR="1"),
    )
    assert proc.returncode == USAGE_EXIT_CODE
    assert "Traceback" in proc.stderr and "ERROR: train.steps=0" in proc.stderr


def test_a_bad_sweep_point_stops_the_sweep_before_its_first_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_app(
        "mechanism",
        ["-m", "profile=smoke", "logger=none", "train.steps=5,0", f"hydra.sweep.dir={sweep}"],
    )
    assert proc.returncode == USAGE_EXIT_CODE, proc.stdout + proc.stderr
    assert "ERROR: sweep point profile=smoke logger=none train.steps=0" in proc.stderr
    assert not list(sweep.rglob("results.json"))


def test_help_lists_only_what_the_app_runs():
    proc = run_app("vision", ["--help"])
    assert proc.returncode == 0
    choices = proc.stdout.split("== Settings")[0]
    assert "experiment: deit_tiny_imagenet, deit_small_imagenet" in choices
    assert "data: digits, imagenet" in choices
    for other in ("lm_wikitext103", "mt_iwslt14_deen", "wikitext103", "transformer_lm"):
        assert other not in choices


# --- point 8: the command that resumes ----------------------------------------------------------


def test_a_stopped_run_prints_the_command_that_resumes_it(tmp_path):
    """Without hydra.run.dir the run dir has a time stamp: "rerun the same command" would
    start a new run. The printed command names the run dir, and resumes."""
    env = app_env(PYTHONPATH=str(REPO))
    overrides = ["experiment=deit_tiny_imagenet", "profile=smoke", "logger=none",
                 "trainer.batch_size=128", "trainer.threads=1", "trainer.stop_after_steps=2"]  # fmt: skip
    first = run_app("vision", overrides, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    (hint,) = [line for line in first.stdout.splitlines() if "to resume: " in line]
    command = shlex.split(hint.split("to resume: ", 1)[1])
    assert command[:3] == ["python", "-m", "experiments.vision"]
    (run_dir,) = (tmp_path / "runs" / "image_classification").iterdir()
    assert command[-1] == f"hydra.run.dir={run_dir}"
    again = run([sys.executable, *command[1:]], env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resuming from {run_dir} at step 2" in again.stdout
    assert len(list((tmp_path / "runs" / "image_classification").iterdir())) == 1


def test_outside_hydra_the_hint_names_the_run_dir(tmp_path):
    assert resume_hint(tmp_path) == f"rerun the same command to resume from {tmp_path}"


# --- point 9: the project's own lines -----------------------------------------------------------


def test_the_default_output_is_the_projects_own_lines(tmp_path):
    """A fresh smoke corpus (Hugging Face datasets), fairseq training and scoring: every line
    is one of ours; no progress bars, warnings or third-party log records."""
    proc = run_app(
        "language_model",
        [*TINY_LM, "train.max_update=2", f"data.root={tmp_path / 'data'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines and all(line.startswith(("[data]", "[lm]")) for line in lines), lines


def test_third_party_warnings_are_hidden_unless_verbose(monkeypatch):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    level = logging.getLogger().level
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            configure_output(verbose=False)
            warnings.warn_explicit("third party", UserWarning, "x.py", 1, module="timm.data")
            warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="experiments.core.console")
            assert [str(w.message) for w in seen] == ["ours"]
            assert logging.getLogger().level == logging.ERROR
            assert os.environ[VERBOSE_ENV] == "0" and not verbose()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            configure_output(verbose=True)
            warnings.warn_explicit("third party", UserWarning, "x.py", 1, module="timm.data")
            assert [str(w.message) for w in seen] == ["third party"] and verbose()
    finally:
        logging.getLogger().setLevel(level)
        for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
            os.environ.pop(name, None)


def test_subword_nmt_progress_bar_only_when_verbose(tmp_path, monkeypatch):
    from experiments.pipelines.fairseq import translation_text as tt

    text = tmp_path / "train.txt"
    text.write_text("das haus ist klein\nein kleines haus\n" * 20)
    for flag, shown in (("0", False), ("1", True)):
        monkeypatch.setenv(VERBOSE_ENV, flag)
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        tt.learn_bpe(text, tmp_path / "codes", 10)
        monkeypatch.undo()
        assert ("it/s" in err.getvalue()) is shown


# --- point 10: no fixed timeouts in tests -------------------------------------------------------

# Deadlines on things that take no work may stay: processes dying after SIGKILL, the last
# output lines of a process that has ended (``queue.get``).
_DEADLINES_ALLOWED = {"wait_dead", "get"}


def test_no_test_waits_on_a_fixed_timeout():
    """A subprocess under load takes many times its idle time: tests set no timeouts of
    their own; pytest-timeout (pyproject.toml) is the one guard against a hung test."""
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert int(ini["timeout"]) >= 1800
    fixed = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name not in _DEADLINES_ALLOWED and any(
                    k.arg == "timeout" for k in node.keywords
                ):
                    fixed.append(f"{path.name}:{node.lineno} {name}(timeout=...)")
            elif (
                isinstance(node, ast.FunctionDef)
                and node.name not in _DEADLINES_ALLOWED
                and any(a.arg == "timeout" for a in node.args.args + node.args.kwonlyargs)
            ):
                fixed.append(f"{path.name}:{node.lineno} def {node.name}(timeout=...)")
    assert fixed == []
