"""The composed config of every app is checked before any work starts.

A Hydra callback (``hydra.callbacks.check_config`` in ``configs/suite.yaml``) runs
:func:`problems` on the composed config before Hydra creates the run directory (and on
every point of a sweep before its first job). A run is refused, with one line per problem
naming the key, the bad value, what is allowed and the fix (``RunStop``, exit code
2), when

* the experiment, data set or model belongs to another app (``experiment=lm_wikitext103``
  given to ``experiments.vision``);
* a key is one no config file of the app declares, so no code would read it
  (``+optim.lr=1e6``): the declared keys are the union of the keys of the app's config files
  (its primary config, ``suite.yaml``, its experiments and the group options it can select);
* a value has another type than the declared one, or breaks one of :data:`RULES` (ranges
  and choices: ``trainer.epochs=0``, ``optim.lr_base=-0.003``,
  ``model.output_normalizer=sparsmax``, ``train.lr=-1``);
* a fairseq option the config files do not declare (``+train.max_epoch=2``) is unknown to
  fairseq or has a value fairseq's parser refuses: those are checked by fairseq's own
  parser in a short child process (``experiments.pipelines.fairseq.worker check_args``), since
  importing fairseq here would shadow our configs in Hydra's ConfigStore.

The same callback keeps the ``.hydra/`` record of an existing run directory as its first
invocation wrote it, and sets the project's output (``configure_output``).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from experiments.core.console import configure_output
from experiments.core.errors import RunStop
from experiments.core.io import REPO_ROOT
from experiments.core.rundir import note_run_dir, stops_cleanly

CONFIG_DIR = REPO_ROOT / "configs"
# Groups every app shares (configs/suite.yaml); launcher options only hold Hydra settings.
SHARED_GROUPS = ("normalizer", "logger", "launcher", "profile")


# --- which app runs what ---------------------------------------------------------------------


@dataclass(frozen=True)
class AppSpec:
    """One Hydra app: its primary config ``configs/<name>.yaml`` and what it can run."""

    name: str
    summary: str
    experiments: tuple[str, ...] = ()
    # groups where only some options belong to this app (the others are another app's)
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # subtrees that hold another tool's options under their own names (fairseq's flags)
    passthrough: tuple[str, ...] = ()
    # mappings whose entries may have any name (each entry is read by the code)
    open_mappings: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return f"experiments.{self.name}"


FAIRSEQ_PASSTHROUGH = ("train", "evaluate.args", "model.args")

APPS: dict[str, AppSpec] = {
    spec.name: spec
    for spec in (
        AppSpec(
            "vision",
            "image classification with DeiT-tiny / DeiT-small (global average pooling), timm",
            ("deit_tiny_imagenet", "deit_small_imagenet"),
            {"data": ("imagenet", "digits"), "model": ("deit_tiny", "deit_small", "deit_smoke")},
        ),
        AppSpec(
            "language_model",
            "WikiText-103 language modelling with fairseq's transformer_lm",
            ("lm_wikitext103",),
            {
                "data": ("wikitext103", "wikitext103_smoke"),
                "model": ("transformer_lm_paper", "transformer_lm_smoke", "transformer_lm_wiki103"),
            },
            passthrough=FAIRSEQ_PASSTHROUGH,
        ),
        AppSpec(
            "translation",
            "IWSLT'14 De->En and WMT'14 En->De translation with fairseq transformers",
            ("mt_iwslt14_deen", "mt_wmt14_ende"),
            {
                "data": ("iwslt14_deen", "iwslt14_deen_smoke", "wmt14_ende", "wmt14_ende_smoke"),
                "model": (
                    "transformer_iwslt_de_en",
                    "transformer_iwslt_smoke",
                    "transformer_wmt_en_de",
                    "transformer_wmt_smoke",
                ),
            },
            passthrough=FAIRSEQ_PASSTHROUGH,
        ),
        AppSpec(
            "mechanism",
            "the mechanism study: one attention layer on a retrieval task with known answers",
            ("mechanism_retrieval",),
        ),
        AppSpec(
            "benchmark",
            "speed and peak memory of MultiMax against SoftMax, measured side by side",
            open_mappings=("attention.shapes",),
        ),
    )
}


def owner_of(group: str, option: str) -> str | None:
    """The app whose ``group=option`` (experiment, data, model) it is, if one app's."""
    for spec in APPS.values():
        if (group == "experiment" and option in spec.experiments) or option in spec.options.get(
            group, ()
        ):
            return spec.name
    return None


# --- the keys an app's config files declare ---------------------------------------------------


@dataclass
class Declared:
    """A key of the config files: the types its values have there, one value and its file."""

    types: set[str] = field(default_factory=set)
    values: list = field(default_factory=list)  # the scalar values the files give it
    source: str = ""

    @property
    def example(self) -> Any:
        return self.values[0] if self.values else None


def _yaml(path: Path) -> tuple[dict, bool]:
    """(the file's content without ``defaults`` / ``hydra``, whether it is ``_global_``)."""
    node = OmegaConf.load(path)
    data = OmegaConf.to_container(node, resolve=False) or {}
    data.pop("defaults", None)
    data.pop("hydra", None)
    head = path.read_text().split("\n", 3)[:3]
    return data, any(line.strip() == "# @package _global_" for line in head)


def _kind(value: Any) -> str:
    if isinstance(value, str) and "${" in value:
        return "interpolation"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    for name, kind in (("int", int), ("float", float), ("str", str), ("list", list)):
        if isinstance(value, kind):
            return name
    return "dict"


def _declare(into: dict[str, Declared], data: Any, prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        entry = into.setdefault(path, Declared())
        entry.types.add(_kind(value))
        if not isinstance(value, dict | list) and value is not None and value not in entry.values:
            entry.values.append(value)
            entry.source = entry.source if len(entry.values) > 1 else source
        entry.source = entry.source or source
        _declare(into, value, path, source)


def _group_options(group: str, spec: AppSpec) -> list[str]:
    folder = CONFIG_DIR / group
    every = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    chosen = spec.options.get(group)
    return [o for o in every if o in chosen] if chosen is not None else every


def app_groups(spec: AppSpec) -> list[str]:
    """The config groups an app composes (from its primary config's and suite's defaults)."""
    groups: list[str] = []
    for name in ("suite", spec.name):
        for item in OmegaConf.load(CONFIG_DIR / f"{name}.yaml").get("defaults", []):
            if isinstance(item, str) or OmegaConf.is_dict(item) is False:
                continue
            for key in item:
                group = str(key).removeprefix("optional ").removeprefix("override ")
                group = group.split("@")[0].strip()
                if "/" not in group and group not in ("experiment", "experiment_profile"):
                    groups.append(group)
    return list(dict.fromkeys(groups))


@cache
def declared_keys(app: str) -> dict[str, Declared]:
    """Every dotted key the app's config files declare."""
    spec = APPS[app]
    keys: dict[str, Declared] = {}
    for name in ("suite", app):
        data, _ = _yaml(CONFIG_DIR / f"{name}.yaml")
        _declare(keys, data, "", f"configs/{name}.yaml")
    for group in app_groups(spec):
        keys.setdefault(group, Declared()).types.add("dict")
        for option in _group_options(group, spec):
            path = CONFIG_DIR / group / f"{option}.yaml"
            data, is_global = _yaml(path)
            _declare(keys, data, "" if is_global else group, f"configs/{group}/{option}.yaml")
    for experiment in spec.experiments:
        data, _ = _yaml(CONFIG_DIR / "experiment" / f"{experiment}.yaml")
        _declare(keys, data, "", f"configs/experiment/{experiment}.yaml")
    return keys


# --- rules: types, ranges, choices --------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What a key's value may be: ``ok`` checks it, ``describe()`` says it in words."""

    ok: Callable[[Any], bool]
    allowed: str | Callable[[], str]
    choices: Callable[[], list] | None = None  # for "did you mean ...?"

    def describe(self) -> str:
        return self.allowed() if callable(self.allowed) else self.allowed


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(low: int | None = None, high: int | None = None, null: bool = False,
            also: tuple = (), what: str = "") -> Rule:  # fmt: skip
    """An integer in [low, high] (or one of ``also``, or null)."""
    bounds = [f">= {low}" if low is not None else "", f"<= {high}" if high is not None else ""]
    text = " ".join(["an integer", " and ".join(b for b in bounds if b)]).strip()
    text += "".join(f" or {a}" for a in also) + (" or null" if null else "")

    def ok(v: Any) -> bool:
        if v is None or v in also:
            return v is not None or null
        return _is_int(v) and (low is None or v >= low) and (high is None or v <= high)

    return Rule(ok, text + (f" ({what})" if what else ""))


def number(gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, null: bool = False, what: str = "") -> Rule:  # fmt: skip
    """A finite number within the given bounds (or null)."""
    bounds = [(">", gt), (">=", ge), ("<", lt), ("<=", le)]
    parts = [f"{op} {bound:g}" for op, bound in bounds if bound is not None]
    text = "a number" + (" " + " and ".join(parts) if parts else "") + (" or null" if null else "")

    def ok(v: Any) -> bool:
        if v is None:
            return null
        return _is_number(v) and not (
            (gt is not None and v <= gt)
            or (ge is not None and v < ge)
            or (lt is not None and v >= lt)
            or (le is not None and v > le)
        )

    return Rule(ok, text + (f" ({what})" if what else ""))


def one_of(choices: Iterable[Any] | Callable[[], Iterable[Any]], null: bool = False,
           what: str = "") -> Rule:  # fmt: skip
    """One of ``choices`` (a callable is asked when a value is checked: lazy imports)."""

    def values() -> list:
        return list(choices() if callable(choices) else choices)

    def text() -> str:
        return ("one of " + ", ".join(map(str, values())) + (" or null" if null else "")
                + (f" ({what})" if what else ""))  # fmt: skip

    return Rule(lambda v: (null and v is None) or (v is not None and v in values()), text, values)


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
UNIT = number(ge=0, le=1, what="a probability or share")


def _normalizers() -> list[str]:
    from multimax import NORMALIZERS

    return list(NORMALIZERS)


def _attention_paths() -> list[str]:
    from multimax import ATTENTION_PATHS

    return ["auto", *ATTENTION_PATHS]


def _timm_optimizers() -> list[str]:
    from timm.optim import list_optimizers

    return list(list_optimizers())


def _betas(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)


def _fairseq_betas(v: Any) -> bool:
    found = re.fullmatch(r"\(\s*([0-9.eE+-]+)\s*,\s*([0-9.eE+-]+)\s*\)", str(v).strip())
    try:
        return bool(found) and all(0 <= float(b) < 1 for b in found.groups())
    except ValueError:
        return False


SHARED_RULES: dict[str, Rule] = {
    "seed": integer(0),
    "dry_run": BOOL,
    "verbose": BOOL,
    "normalizer.name": one_of(_normalizers, what="choose it with normalizer=NAME"),
    "normalizer.order": integer(1, what="MultiMax's order K"),
    "normalizer.temperature": number(gt=0),
    "normalizer.learn_temperature": BOOL,
    "model.output_normalizer": one_of(_normalizers),
    "model.attention_impl": one_of(_attention_paths),
    "logger.name": one_of(("wandb", "none"), what="choose it with logger=wandb|none"),
    "logger.mode": one_of(("offline", "online", "disabled")),
    "profile.name": one_of(("paper", "smoke"), what="choose it with profile=paper|smoke"),
}

VISION_RULES: dict[str, Rule] = {
    "trainer.epochs": integer(1, what="training epochs"),
    "trainer.batch_size": integer(1, what="the global batch"),
    "trainer.eval_batch_size": integer(1),
    "trainer.label_smoothing": number(ge=0, lt=1),
    "trainer.amp": one_of(("auto", "bfloat16", "float16", "none")),
    "trainer.compile": BOOL,
    "trainer.ema": BOOL,
    "trainer.ema_decay": number(gt=0, lt=1),
    "trainer.eval_every_epochs": integer(1),
    "trainer.checkpoint_every_steps": integer(1),
    "trainer.log_every_steps": integer(1),
    "trainer.stop_after_steps": integer(1, null=True),
    "trainer.inject_nan_at_step": integer(1, null=True),
    "trainer.device": one_of(("auto", "cpu", "cuda")),
    "trainer.threads": integer(1, null=True),
    "trainer.dry_run_world_size": integer(1),
    "trainer.dry_run_cpu_batch": integer(1),
    "trainer.procs_per_node": integer(1, also=("auto",)),
    "optim.opt": one_of(_timm_optimizers, what="timm's optimizer names"),
    "optim.lr_base": number(gt=0, what="scaled by trainer.batch_size / optim.lr_base_batch"),
    "optim.lr_base_batch": integer(1),
    "optim.weight_decay": number(ge=0),
    "optim.eps": number(gt=0),
    "optim.betas": Rule(_betas, "a list of two numbers in [0, 1)"),
    "optim.clip_grad": number(gt=0, null=True),
    "optim.sched": one_of(("cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd")),
    "optim.warmup_epochs": integer(0),
    "optim.warmup_lr": number(ge=0),
    "optim.min_lr": number(ge=0),
    "augment.hflip": UNIT,
    "augment.color_jitter": number(ge=0),
    "augment.reprob": UNIT,
    "augment.remode": one_of(("pixel", "rand", "const")),
    "augment.recount": integer(1),
    "augment.mixup": number(ge=0),
    "augment.cutmix": number(ge=0),
    "augment.mixup_prob": UNIT,
    "augment.mixup_switch_prob": UNIT,
    "augment.mixup_mode": one_of(("batch", "pair", "elem")),
    "augment.repeated_aug": BOOL,
    "augment.repeats": integer(1),
    "data.num_classes": integer(2),
    "data.img_size": integer(1),
    "data.in_chans": integer(1),
    "data.crop_pct": number(gt=0, le=1),
    "data.num_workers": integer(0),
    "data.pin_memory": BOOL,
    "data.train_size": integer(1),
    "data.val_size": integer(1),
    "data.bad_images": one_of(("refuse", "skip")),
    "model.drop_path": number(ge=0, lt=1),
    "model.drop": number(ge=0, lt=1),
}

FAIRSEQ_RULES: dict[str, Rule] = {
    "train.lr": number(gt=0, what="fairseq's --lr, the peak learning rate"),
    "train.max_update": integer(1, what="updates to train"),
    "train.warmup_updates": integer(0),
    "train.warmup_init_lr": number(ge=0),
    "train.weight_decay": number(ge=0),
    "train.clip_norm": number(ge=0, what="0 switches clipping off"),
    "train.max_tokens": integer(1, what="tokens per micro-batch and GPU"),
    "train.update_freq": integer(1),
    "train.tokens_per_sample": integer(1),
    "train.label_smoothing": number(ge=0, lt=1),
    "train.precision": one_of(("fp32", "fp16", "amp", "bf16")),
    "train.adam_betas": Rule(_fairseq_betas, 'a pair "(b1, b2)" with both in [0, 1)'),
    "train.save_interval_updates": integer(0),
    "train.keep_interval_updates": integer(-1),
    "train.log_interval": integer(1),
    "train.num_workers": integer(0),
    "train.output_sigma_grad_scale": one_of(("inv_sqrt_vocab", "none"), null=True),
    "train.eps_perplexity_epsilon": number(gt=0, lt=1),
    "evaluate.eps_perplexity_epsilon": number(gt=0, lt=1, what="the ε of the ε-perplexity"),
    "evaluate.args.beam": integer(1),
    "evaluate.args.batch_size": integer(1),
    "evaluate.args.tokens_per_sample": integer(1),
    "evaluate.args.context_window": integer(0),
    "evaluate.args.lenpen": number(),
    "distributed.world_size": integer(1, also=("auto",)),
    "distributed.port": integer(1, 65535),
    "dry_run_options.world_size": integer(1),
    "dry_run_options.cpu_max_tokens": integer(0),
    "data.workers": integer(1),
    "data.corpus.generate.n_*": integer(1),
}

MECHANISM_RULES: dict[str, Rule] = {
    "threads": integer(1),
    "data.num_items": integer(1),
    "data.num_relevant": integer(1),
    "data.num_classes": integer(2),
    "data.key_noise": number(ge=0),
    "data.value_std": number(gt=0),
    "data.eval_examples": integer(1),
    "model.dim": integer(1),
    "model.heads": integer(1),
    "model.output_normalizer": one_of(
        ("none",), what="the regression head has no output normaliser"
    ),
    "train.steps": integer(1),
    "train.batch_size": integer(1),
    "train.lr": number(gt=0),
    "train.weight_decay": number(ge=0),
    "train.log_every": integer(1),
    "eval.rel_threshold": number(gt=0, le=1),
    "eval.examples_to_save": integer(0),
    "eval.score_examples": integer(1),
}

RULES: dict[str, dict[str, Rule]] = {
    "vision": {**SHARED_RULES, **VISION_RULES},
    "language_model": {**SHARED_RULES, **FAIRSEQ_RULES},
    "translation": {**SHARED_RULES, **FAIRSEQ_RULES, "data.recipe.bpe_symbols": integer(1)},
    "mechanism": {**SHARED_RULES, **MECHANISM_RULES},
    "benchmark": {
        **SHARED_RULES,
        "threads": integer(1, null=True),
        "repeats": integer(1),
        "warmup": integer(0),
    },  # fmt: skip
}


def _cross_checks(app: str, cfg: Mapping) -> list[str]:
    """Rules that relate two keys."""
    out = []
    if app == "language_model":
        args = (cfg.get("evaluate") or {}).get("args") or {}
        window, block = args.get("context_window"), args.get("tokens_per_sample")
        if _is_int(window) and _is_int(block) and window >= block:
            out.append(
                f"evaluate.args.context_window={window}: must be smaller than "
                f"evaluate.args.tokens_per_sample={block} (fairseq-eval-lm scores each block "
                f"with that much context); e.g. evaluate.args.context_window={block // 2}"
            )
    if app == "mechanism":
        data, model = cfg.get("data") or {}, cfg.get("model") or {}
        m, n = data.get("num_relevant"), data.get("num_items")
        if _is_int(m) and _is_int(n) and m > n:
            out.append(f"data.num_relevant={m}: must be <= data.num_items={n}")
        dim, heads = model.get("dim"), model.get("heads")
        if _is_int(dim) and _is_int(heads) and heads > 0 and dim % heads:
            out.append(f"model.heads={heads}: must divide model.dim={dim}")
    return out


# --- the check -------------------------------------------------------------------------------


def _flat(data: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path, value
            yield from _flat(value, path)


def _under(key: str, prefixes: Iterable[str]) -> str | None:
    return next((p for p in prefixes if key == p or key.startswith(p + ".")), None)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _suggest(name: Any, candidates: Iterable[Any]) -> str:
    """``; did you mean X?`` for the closest candidate (by spelling, else by a shared word:
    ``lr`` -> ``lr_base``), or nothing."""
    names = [str(c) for c in candidates]
    close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
    close = close or [c for c in names if str(name) in c.split("_")][:1]
    return f"; did you mean {close[0]}?" if close else ""


def _suggest_key(parent: str, leaf: str, siblings: list[str]) -> str:
    hint = _suggest(leaf, siblings)
    return hint.replace("mean ", f"mean {parent}.") if hint and parent else hint


def _type_ok(value: Any, types: set[str]) -> bool:
    """Whether ``value`` has one of the declared types (any, when only nulls or
    interpolations are declared; an int where a float or a string is declared)."""
    if types <= {"interpolation", "null"} or "interpolation" in types:
        return True
    kind = _kind(value)
    if kind == "int" and types & {"float", "str"}:
        return True
    return kind in types or (kind == "float" and "str" in types)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "list": "a list", "dict": "a mapping", "null": "null"}  # fmt: skip


def _example(key: str, entry: Declared | None) -> str:
    if entry is None or entry.example is None or "${" in str(entry.example):
        return ""
    return f"; e.g. {key}={_show(entry.example)} ({entry.source})"


def _rule_for(key: str, rules: Mapping[str, Rule]) -> Rule | None:
    if key in rules:
        return rules[key]
    wild = (
        r for pattern, r in rules.items() if "*" in pattern and fnmatch.fnmatchcase(key, pattern)
    )
    return next(wild, None)


def _value_problem(key: str, value: Any, entry: Declared | None, rule: Rule | None) -> str | None:
    if rule is not None:
        if rule.ok(value):
            return None
        hint = _suggest(value, rule.choices()) if rule.choices and isinstance(value, str) else ""
        return f"{key}={_show(value)}: expected {rule.describe()}{hint or _example(key, entry)}"
    if entry is None or _type_ok(value, entry.types):
        return None
    kinds = sorted(entry.types - {"interpolation"})
    allowed = " or ".join(_TYPE_WORDS.get(k, k) for k in kinds)
    return f"{key}={_show(value)}: expected {allowed}{_example(key, entry)}"


def _wrong_app(app: str, choices: Mapping[str, str]) -> list[str]:
    spec = APPS[app]
    out = []
    for group in ("experiment", "data", "model"):
        option = choices.get(group)
        mine = spec.experiments if group == "experiment" else spec.options.get(group)
        if option is None or mine is None or option in mine:
            continue
        other = owner_of(group, option)
        where = ""
        if other and group == "experiment":
            where = f"; it is run by python -m experiments.{other} experiment={option}"
        elif other:
            where = f"; it belongs to experiments.{other}"
        out.append(
            f"{group}={option}: not one of experiments.{app}'s (choose one of "
            f"{', '.join(mine) or 'none'}){where}"
        )
        if group == "experiment":
            break  # its data and model follow from it
    return out


def problems(cfg: DictConfig | Mapping, app: str, choices: Mapping[str, str] | None = None,
             fairseq_check: bool = True) -> list[str]:  # fmt: skip
    """One line per problem of the composed config of ``app`` (empty: it may run).

    ``choices``: Hydra's group choices (``hydra.runtime.choices``), when known;
    ``fairseq_check``: ask fairseq's parser about fairseq options no config file declares."""
    spec = APPS[app]
    wrong = _wrong_app(app, dict(choices or {}))
    if wrong:
        return wrong  # everything else would only repeat that mistake
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    node = OmegaConf.masked_copy(node, [k for k in node if k != "hydra"])
    try:
        data = OmegaConf.to_container(node, resolve=True)
    except Exception as err:  # noqa: BLE001 - any unresolvable value is the user's to fix
        key = getattr(err, "full_key", "") or "a value"
        first = (str(err).splitlines() or [type(err).__name__])[0]
        return [f"{key}: cannot be resolved ({first})"]

    declared = declared_keys(app)
    rules = RULES[app]
    out: list[str] = []
    passthrough: dict[str, Any] = {}
    skip: list[str] = []
    for key, value in _flat(data):
        if _under(key, skip):
            continue
        entry = declared.get(key)
        through = _under(key, spec.passthrough)
        if through is not None and key != through:  # another tool's option, by its own name
            if not isinstance(value, dict):
                passthrough[key] = value
            problem = _value_problem(key, value, entry, _rule_for(key, rules))
            out += [problem] if problem else []
            continue
        open_map = _under(key, spec.open_mappings)
        if open_map is not None and key != open_map:
            skip.append(key)  # an entry of a mapping whose entries may have any name
            continue
        if entry is None:
            parent, _, leaf = key.rpartition(".")
            siblings = [k.rpartition(".")[2] for k in declared if k.rpartition(".")[0] == parent]
            where = f"{parent} has" if parent else "the top level has"
            out.append(
                f"{key}={_show(value)}: experiments.{app} has no setting {key}, so nothing "
                f"would read it{_suggest_key(parent, leaf, siblings)} ({where}: "
                f"{', '.join(siblings)})"
            )
            skip.append(key)
            continue
        problem = _value_problem(key, value, entry, _rule_for(key, rules))
        if problem:
            out.append(problem)
            skip.append(key)
    out += _cross_checks(app, data)
    if not out and fairseq_check and spec.passthrough:
        out += fairseq_problems(node, passthrough, declared)
    return out


# --- fairseq's own options, checked by fairseq -------------------------------------------------

# fairseq options whose value decides which other options exist
_FAIRSEQ_COMPONENTS = ("model.arch", "train.task", "train.criterion", "train.optimizer",
                       "train.lr_scheduler")  # fmt: skip


def unvouched_fairseq_keys(data: Mapping, passthrough: Mapping[str, Any],
                           declared: Mapping[str, Declared]) -> list[str]:  # fmt: skip
    """The fairseq-bound keys our config files do not vouch for: names no file declares,
    and component choices (architecture, task, criterion, ...) no file makes."""
    keys = [k for k in passthrough if k not in declared]
    for key in _FAIRSEQ_COMPONENTS:
        value: Any = data
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        entry = declared.get(key)
        if value is not None and entry is not None and value not in entry.values:
            keys.append(key)
    return list(dict.fromkeys(keys))


def fairseq_problems(cfg: DictConfig, passthrough: Mapping[str, Any],
                     declared: Mapping[str, Declared]) -> list[str]:  # fmt: skip
    """fairseq's own parser on this run's command lines, when they hold options the config
    files do not vouch for (in a child process: fairseq must not be imported here)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    keys = unvouched_fairseq_keys(data, passthrough, declared)
    if not keys:
        return []
    from experiments.pipelines.fairseq import run as fairseq_run

    try:
        found = fairseq_run.parse_with_fairseq(fairseq_run.check_command_lines(cfg))
    except RunStop as stop:  # e.g. a stock architecture asked for MultiMax
        return [str(stop)]
    except RuntimeError as err:
        return [f"{', '.join(keys)}: {err}"]
    return [_fairseq_message(program, error, keys) for program, error in found if error]


def _fairseq_message(program: str, error: str, keys: list[str]) -> str:
    """fairseq's argparse error as a line about our config keys."""

    def key_of(flag: str) -> str:
        name = flag.lstrip("-").replace("-", "_")
        return next((k for k in keys if k.endswith("." + name)), flag)

    unknown = re.search(r"unrecognized arguments: (.*)", error)
    if unknown:
        flags = [f for f in unknown.group(1).split() if f.startswith("--")]
        return (
            f"{', '.join(map(key_of, flags))}: {program} has no option {', '.join(flags)} with "
            f"this architecture, task, criterion and optimizer; remove it (see {program} --help "
            "for the options there are)"
        )
    bad = re.search(r"argument (--[\w-]+)(?:/-\w+)?: (.*)", error)
    if bad:
        why = re.sub(
            r" \(choose from .*\)", f" (see {program} --help for the choices)", bad.group(2)
        )
        return f"{key_of(bad.group(1))}: {program} refuses it: {why}"
    return f"{', '.join(keys)}: {program} refuses the options: {error}"


# --- sweeps ------------------------------------------------------------------------------------


def sweep_points(task_overrides: list[str]) -> list[list[str]]:
    """Every job's overrides of a basic-sweeper multirun (``a=1,2 b=x,y``: 4 jobs)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(task_overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def sweep_problems(config_name: str, task_overrides: list[str]) -> list[str]:
    """Each point of a sweep composed and checked, before the first job starts."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    hydra = GlobalHydra.instance().hydra
    out = []
    points = sweep_points(task_overrides)
    for job in points:
        label = f"sweep point {' '.join(job)}" if len(points) > 1 else "sweep"
        try:
            cfg = hydra.compose_config(config_name, job, run_mode=RunMode.RUN)
        except Exception as err:  # noqa: BLE001 - Hydra's own composition errors
            out.append(f"{label}: {' '.join(str(err).split())}")
            continue
        out += [f"{label}: {p}" for p in problems(cfg, config_name, cfg.hydra.runtime.choices)]
    return out


# --- the Hydra callback ---------------------------------------------------------------------------

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra is always installed with the apps
    Callback = object  # type: ignore[assignment,misc]


def refuse(lines: list[str]) -> None:
    """Stop with the problems, one ``ERROR:`` line each (``stops_cleanly``)."""
    with stops_cleanly():
        raise RunStop("\nERROR: ".join(lines))


class CheckConfig(Callback):
    """``hydra.callbacks.check_config``: the checks above, before any work starts."""

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **_: Any) -> None:
        app = config_name or str(config.hydra.job.config_name)
        if app not in APPS:
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
        app = config_name or str(config.hydra.job.config_name)
        if app not in APPS:
            return
        found = sweep_problems(app, list(config.hydra.overrides.task))
        if found:
            refuse(found)

    def on_job_start(self, config: DictConfig, **_: Any) -> None:
        configure_output(bool(config.get("verbose", False)))


# --- --help ------------------------------------------------------------------------------------


def help_text(app: str) -> str:
    """``python -m experiments.<app> --help``: what this app runs, then its config
    (``$CONFIG`` is filled in by Hydra)."""
    spec = APPS[app]
    lines = [
        f"python -m {spec.module} [group=option ...] [key=value ...] [-m for a sweep]",
        "",
        spec.summary[0].upper() + spec.summary[1:] + ".",
        "",
        "== Choices (group=option) ==",
    ]
    if spec.experiments:
        lines.append(f"  experiment: {', '.join(spec.experiments)}   (configs/experiment/)")
    for group in app_groups(spec):
        lines.append(f"  {group}: {', '.join(_group_options(group, spec))}")
    lines += [
        "",
        "The experiment file pins the paper's recipe; profile=smoke runs it on small local",
        "data in minutes on a CPU. A setting that does not exist or a value out of range stops",
        "the run before it starts, naming the key; verbose=true shows third-party warnings.",
        "",
        "== Settings (key=value), as composed with the overrides given ==",
        "$CONFIG",
        "Hydra's own options: --hydra-help",
    ]
    return "\n".join(lines)


# ``hydra.help.template`` in configs/suite.yaml calls ``${app_help:<app>}``; every app imports
# this module, so the resolver is there before Hydra prints ``--help``.
if not OmegaConf.has_resolver("app_help"):
    OmegaConf.register_new_resolver("app_help", help_text)
