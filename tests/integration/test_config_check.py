"""A newcomer's mistakes end in one line before any work starts: bad values and keys no code
reads are refused by the app's schema naming the key, the value, what is allowed and the fix;
fairseq's options are judged by fairseq's own parser; everything shipped is accepted."""

from __future__ import annotations

import pytest
from omegaconf import open_dict, read_write

from experiments.config import check as config_check
from experiments.config import options
from experiments.config.schemas import SCHEMAS
from experiments.core import registry
from experiments.core.errors import USAGE_EXIT_CODE
from experiments.core.io import REPO_ROOT
from experiments.pipelines.fairseq import commands as fairseq_commands
from tests.composition import compose

REPO = REPO_ROOT
PROFILES = ("paper", "smoke")
NORMALIZERS = sorted(p.stem for p in (REPO / "configs" / "normalizer").glob("*.yaml"))
APPS = tuple(SCHEMAS)


def problems(app: str, overrides: list[str], fairseq_check: bool = False) -> list[str]:
    cfg = compose(app, overrides, hydra=True)
    return config_check.problems(cfg, app, cfg.hydra.runtime.choices, fairseq_check)


# --- what ships is accepted -------------------------------------------------------------------


@pytest.mark.parametrize("app", APPS)
def test_every_shipped_experiment_profile_and_normalizer_passes(app):
    experiments = options.app_experiments(app) or (None,)
    for experiment in experiments:
        for profile in PROFILES:
            for normalizer in NORMALIZERS:
                overrides = [f"profile={profile}", f"normalizer={normalizer}"]
                overrides += [f"experiment={experiment}"] if experiment else []
                if normalizer == "stickbreaking" and app in ("vision", "translation"):
                    assert "causal only" in " ".join(problems(app, overrides)), overrides
                    continue
                assert problems(app, overrides) == [], overrides


@pytest.mark.parametrize("group", ["data", "model", "augment", "optim", "trainer", "logger"])
def test_every_option_of_a_group_passes_the_check_of_the_apps_that_select_it(group):
    checked = 0
    for app in APPS:
        if group not in options.app_groups(app):
            continue
        for option in options.group_options(group, app):
            assert problems(app, [f"{group}={option}"]) == [], (app, group, option)
            checked += 1
    assert checked


def test_every_experiment_data_and_model_file_belongs_to_one_app():
    """An experiment names its app in registry.app, a data or model file in kind:."""
    for name, experiment in registry.experiments().items():
        assert experiment.app in SCHEMAS, name
    for group in ("data", "model"):
        for path in sorted((REPO / "configs" / group).glob("*.yaml")):
            kind = options.kind_of(group, path.stem)
            assert kind in SCHEMAS, f"{group}/{path.name} belongs to {kind or 'no app'}"
            owners = [app for app in SCHEMAS if path.stem in options.group_options(group, app)]
            assert owners == [kind], (group, path.name, owners)


def test_shipped_fairseq_options_are_options_fairseq_knows():
    """The fairseq options of every LM / MT experiment and profile, parsed by fairseq's own
    parsers (the check leaves the options it does not type to fairseq, so they must be right)."""
    lines = []
    for app in ("language_model", "translation"):
        for experiment in options.app_experiments(app):
            for profile in PROFILES:
                cfg = compose(app, [f"experiment={experiment}", f"profile={profile}"])
                lines += fairseq_commands.check_command_lines(cfg)
    found = fairseq_commands.parse_with_fairseq(lines)
    assert len(found) == len(lines)
    assert [error for _, error in found if error] == []


# --- bad values, named with what is allowed and a fix -----------------------------------------

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
    ("vision", ["model.output_normalizer=softpick"],
     ["model.output_normalizer=softpick is refused:", "cannot be an output layer"]),
    ("vision", ["normalizer=sigmoid", "model.output_normalizer=sigmoid"],  # explicit, same name
     ["model.output_normalizer=sigmoid is refused:", "cannot be an output layer"]),
    ("language_model", ["model.output_normalizer=stickbreaking"],
     ["model.output_normalizer=stickbreaking is refused:", "causal attention only"]),
    ("translation", ["normalizer=stickbreaking"],
     ["normalizer=stickbreaking: stickbreaking attention is causal only"]),
]  # fmt: skip


@pytest.mark.parametrize(("app", "overrides", "expected"), BAD_VALUES)
def test_a_bad_value_is_one_line_naming_key_value_allowed_and_fix(app, overrides, expected):
    found = problems(app, overrides)
    assert len(found) == 1, found
    assert "\n" not in found[0]
    for text in expected:
        assert text in found[0]


# --- a key no code reads ----------------------------------------------------------------------

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


def test_a_job_of_a_sweep_is_checked_at_its_start(capsys):
    """Whatever the sweeper made of a sweep, each job's composed config is checked when the
    job starts; a bad one stops the sweep with one line naming the job."""
    cfg = compose("mechanism", ["profile=smoke", "model.heads=3"], hydra=True)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.overrides.task = ["profile=smoke", "model.heads=3"]
    with pytest.raises(SystemExit) as stop:
        config_check.CheckConfig().on_job_start(config=cfg, task_function=None)
    assert stop.value.code == USAGE_EXIT_CODE
    err = capsys.readouterr().err.strip()
    assert err == (
        "ERROR: sweep job profile=smoke model.heads=3: model.heads=3: must divide model.dim=32"
    )
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.mode = "RUN"  # a single run was checked before its run directory existed
    config_check.CheckConfig().on_job_start(config=cfg, task_function=None)
