"""The composed config of every app is checked before its work starts, under any sweeper.

:func:`problems` gives one line per problem, naming the key, the bad value, what is allowed
and the fix; a run with any is refused (``RunStop``, exit code 2) when

* the experiment, data set or model belongs to another app (``experiment=lm_wikitext103``
  given to ``experiments.vision``): experiments name their app in ``registry.app``, data and
  model options in ``kind:`` (:mod:`experiments.config.options`);
* the app's schema (:mod:`experiments.config.schemas`) refuses it: a key no code reads
  (``+optim.lr=1e6``), a type, a range or a choice (``trainer.epochs=0``,
  ``model.output_normalizer=sparsmax``, ``train.lr=-1``);
* fairseq's own parser refuses a fairseq option the overrides set and the schema does not
  type (``+train.max_epochs=2``), or a fairseq choice they set (``model.arch=...``); it runs
  in a short child process (importing fairseq here would shadow our configs in Hydra's
  ConfigStore).

The Hydra callback ``hydra.callbacks.check_config`` (``configs/suite.yaml``) checks a single
run before Hydra creates its run directory. A sweep is checked by each job at its start,
whatever the sweeper (basic, Optuna, ...) made of it: a bad job stops the sweep with one
line. Before the first job, each value of each swept key (Hydra's own override grammar:
both ends of an ``interval``) is checked once, with the other keys at their first value, so
a typo or an out-of-range value stops a sweep before it spends anything.

The callback also keeps the ``.hydra/`` record of an existing run directory as its first
invocation wrote it, and sets the project's output (``configure_output``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from pydantic import ValidationError

from experiments.config import messages, options
from experiments.config.schemas import JUDGED_BY_FAIRSEQ, SCHEMAS, Passthrough
from experiments.core import registry
from experiments.core.console import configure_output
from experiments.core.errors import RunStop
from experiments.core.rundir import note_run_dir, stops_cleanly
from experiments.pipelines.fairseq.commands import check_command_lines, parse_with_fairseq
from multimax.normalizers import NORMALIZERS, check_output_normalizer

# --- another app's experiment, data set or model ------------------------------------------------


def _wrong_app(app: str, cfg: DictConfig, choices: Mapping[str, str]) -> list[str]:
    experiment = choices.get("experiment")
    if experiment is not None:
        # the composed experiment's own registry block says its app (any config dir)
        other = OmegaConf.select(cfg, "registry.app", default=None)
        if other is None:
            other = registry.experiment(experiment).app
        if other != app:
            return [
                f"experiment={experiment}: not one of experiments.{app}'s (choose one of "
                f"{', '.join(options.app_experiments(app)) or 'none'}); it is run by "
                f"python -m experiments.{other} experiment={experiment}"
            ]  # its data and model follow from it
    out = []
    for group in ("data", "model"):
        kind = OmegaConf.select(cfg, f"{group}.kind", default=None)
        option = choices.get(group) or OmegaConf.select(cfg, f"{group}.name", default="?")
        if kind is not None and kind != app:
            out.append(
                f"{group}={option}: not one of experiments.{app}'s (choose one of "
                f"{', '.join(options.group_options(group, app))}); it belongs to "
                f"experiments.{kind}"
            )
    return out


# --- fairseq's own options, checked by fairseq ----------------------------------------------------


def _for_fairseq(app: str, overrides: Iterable[str]) -> list[str]:
    """The keys the overrides set that fairseq judges: a fairseq option the schema does not
    type, or a fairseq choice (``model.arch``)."""
    keys = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("~+")
        parts, tp, field, section = messages.walk(SCHEMAS[app], tuple(key.split(".")))
        if len(parts) != len(key.split(".")) or section is None:
            continue
        untyped = field is None and issubclass(section, Passthrough)
        extra = (field.json_schema_extra or {}) if field is not None else {}
        if untyped or JUDGED_BY_FAIRSEQ in extra:
            keys.append(key)
    return list(dict.fromkeys(keys))


def fairseq_problems(cfg: DictConfig, keys: list[str]) -> list[str]:
    """fairseq's own parser on this run's command lines (in a child process)."""
    try:
        found = parse_with_fairseq(check_command_lines(cfg))
    except RunStop as stop:  # e.g. a stock architecture asked for MultiMax
        return [str(stop)]
    except RuntimeError as err:
        return [f"{', '.join(keys)}: {err}"]
    return [messages.fairseq_line(program, error, keys) for program, error in found if error]


# --- the check ------------------------------------------------------------------------------------


def _refused_output_normalizer(node: DictConfig) -> str | None:
    """``model.output_normalizer`` set explicitly (not following ``normalizer.name``) to a
    normaliser whose rows are not a distribution: refused, not silently replaced by softmax."""
    model = node.get("model")
    if not isinstance(model, DictConfig) or "output_normalizer" not in model:
        return None
    raw = OmegaConf.to_container(model, resolve=False).get("output_normalizer")
    if not isinstance(raw, str) or raw.startswith("${") or raw not in NORMALIZERS:
        return None  # following the attention's choice (the schema judges the rest)
    try:
        check_output_normalizer(raw)
    except ValueError as err:
        return str(err)
    return None


def problems(cfg: DictConfig, app: str, choices: Mapping[str, str] | None = None,
             fairseq_check: bool = True, overrides: Iterable[str] | None = None) -> list[str]:  # fmt: skip
    """One line per problem of the composed config of ``app`` (empty: it may run).

    ``choices``: Hydra's group choices (``hydra.runtime.choices``); ``overrides``: the run's
    overrides (default ``hydra.overrides.task``), whose fairseq options fairseq's parser
    judges when ``fairseq_check``."""
    choices = dict(choices or {})
    wrong = _wrong_app(app, cfg, choices)
    if wrong:
        return wrong  # everything else would only repeat that mistake
    if overrides is None:
        overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=[])
    node = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        data = OmegaConf.to_container(node, resolve=True)
    except Exception as err:  # noqa: BLE001 - any unresolvable value is the user's to fix
        key = getattr(err, "full_key", "") or "a value"
        first = (str(err).splitlines() or [type(err).__name__])[0]
        return [f"{key}: cannot be resolved ({first})"]
    refused = _refused_output_normalizer(node)
    if refused:
        return [refused]
    try:
        SCHEMAS[app].model_validate(data)
    except ValidationError as err:
        lines: dict[str, str] = {}
        for error in err.errors():
            key, line = messages.line(error, app, data, choices)
            lines.setdefault(key, line)  # one line per key: a union's members all object
        return list(lines.values())
    keys = _for_fairseq(app, overrides) if fairseq_check else []
    return fairseq_problems(node, keys) if keys else []


def _values(override: Override) -> list[str]:
    """``key=value`` for each value of one override (both ends of an interval)."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [override.input_line or f"{key}={override.get_value_element_as_str()}"]
    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        return [f"{key}={sweep.start}", f"{key}={sweep.end}"]
    return [f"{key}={value}" for value in override.sweep_string_iterator()]


def sweep_samples(task_overrides: list[str], params: Mapping[str, str] | None = None
                  ) -> list[list[str]]:  # fmt: skip
    """The overrides of a few jobs of a sweep that hold every value of every swept key once:
    all keys at their first value, then each other value in turn. ``params``: swept keys
    given in the config (``hydra.sweeper.params``), unless an override names them."""
    parser = OverridesParser.create()
    given = parser.parse_overrides(list(task_overrides))
    named = {o.key_or_group for o in given}
    given += parser.parse_overrides(
        [f"{k}={v}" for k, v in (params or {}).items() if k not in named]
    )
    values = []
    for override in given:
        try:
            values.append(_values(override))
        except Exception:  # noqa: BLE001 - a sweep only its sweeper enumerates: each job checks it
            continue
    first = [v[0] for v in values]
    samples = [first]
    for i, each in enumerate(values):
        samples += [[*first[:i], v, *first[i + 1 :]] for v in each[1:]]
    return samples


def sweep_problems(config_name: str, task_overrides: list[str],
                   params: Mapping[str, str] | None = None) -> list[str]:  # fmt: skip
    """:func:`problems` of the first of the :func:`sweep_samples` of a sweep that has any."""
    hydra = GlobalHydra.instance().hydra
    samples = sweep_samples(task_overrides, params)
    for job in samples:
        label = f"sweep point {' '.join(job)}" if len(samples) > 1 else "sweep"
        try:
            cfg = hydra.compose_config(config_name, job, run_mode=RunMode.RUN)
        except Exception as err:  # noqa: BLE001 - Hydra's own composition errors
            return [f"{label}: {' '.join(str(err).split())}"]
        found = problems(cfg, config_name, cfg.hydra.runtime.choices, overrides=job)
        if found:
            return [f"{label}: {p}" for p in found]
    return []


# --- the Hydra callback ---------------------------------------------------------------------------


def refuse(lines: list[str]) -> None:
    """Stop with the problems, one ``ERROR:`` line each (``stops_cleanly``)."""
    with stops_cleanly():
        raise RunStop("\nERROR: ".join(lines))


def _app(config: DictConfig, config_name: str | None) -> str | None:
    app = config_name or str(config.hydra.job.config_name)
    return app if app in SCHEMAS else None


class CheckConfig(Callback):
    """``hydra.callbacks.check_config``: the checks above, before any work starts."""

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **_: Any) -> None:
        app = _app(config, config_name)
        if app is None:
            return
        found = problems(config, app, config.hydra.runtime.choices)
        if found:
            refuse(found)
        run_dir = Path(str(config.hydra.run.dir))
        note_run_dir(run_dir)
        if (run_dir / ".hydra").is_dir():  # an existing run keeps the record of its first start
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None,
                          **_: Any) -> None:  # fmt: skip
        app = _app(config, config_name)
        if app is None:
            return
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        params = OmegaConf.to_container(params) if params is not None else None
        found = sweep_problems(app, list(config.hydra.overrides.task), params)
        if found:
            refuse(found)

    def on_job_start(self, config: DictConfig, **_: Any) -> None:
        app = _app(config, None)
        if app is not None and config.hydra.mode == RunMode.MULTIRUN:
            job = list(config.hydra.overrides.task)
            found = problems(config, app, config.hydra.runtime.choices)
            if found:
                refuse([f"sweep job {' '.join(job)}: {p}" for p in found])
        configure_output(bool(config.get("verbose", False)))
