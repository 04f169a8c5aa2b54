"""The lines a refused config prints: one per key, naming it, its value, what is allowed
and a fix (a close name, or the value a config file of this run gives it)."""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import OmegaConf
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from experiments.config.options import CONFIG_DIR
from experiments.config.schemas import SCHEMAS


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


def _single_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Literal and len(typing.get_args(tp)) == 1


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def describe(tp: Any, constraints: Iterable[Any] = ()) -> str:
    """What a schema type allows, in words (``an integer >= 1 or auto``)."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        extra = [m for meta in args[1:] for m in getattr(meta, "metadata", [meta])]
        return describe(args[0], [*constraints, *extra])
    if origin in (typing.Union, types.UnionType):
        text = " or ".join(
            str(typing.get_args(a)[0]) if _single_literal(a) else describe(a)
            for a in args if a is not type(None)
        )  # fmt: skip
        return text + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    bounds = " and ".join(
        f"{op} {getattr(c, name):g}" for c in constraints for name, op in _BOUNDS.items()
        if getattr(c, name, None) is not None
    )  # fmt: skip
    if tp is bool:
        return "true or false"
    if tp in (int, float):
        return ("an integer" if tp is int else "a number") + (f" {bounds}" if bounds else "")
    if origin is list:
        sizes = {getattr(c, n) for c in constraints for n in ("min_length", "max_length")
                 if getattr(c, n, None) is not None}  # fmt: skip
        size = f" of {sizes.pop()}" if len(sizes) == 1 else ""
        return f"a list{size} (each {describe(args[0])})"
    if origin is dict:
        return f"a mapping (each value {describe(args[1])})"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping of " + ", ".join(tp.model_fields)
    return "a string" if tp is str else str(tp)


def _model_in(tp: Any) -> type[BaseModel] | None:
    """The schema section a type holds (``Section | None`` holds ``Section``)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    found = [m for a in typing.get_args(tp) if (m := _model_in(a)) is not None]
    return found[0] if len(found) == 1 and typing.get_origin(tp) is not dict else None


def walk(schema: type[BaseModel], loc: tuple) -> tuple[list[str], Any, FieldInfo | None, Any]:
    """(key parts, the type there, its field, the section holding it) along a pydantic error
    location, stopping at a leaf (a union member's tag is not a key)."""
    parts: list[str] = []
    tp: Any = schema
    field = section = None
    for element in loc:
        model = _model_in(tp)
        if model is not None:
            section = model
            parts.append(str(element))
            field = model.model_fields.get(str(element))
            if field is None:
                return parts, None, None, section  # a key the section does not name
            tp = field.annotation
        elif typing.get_origin(tp) is dict:
            parts.append(str(element))
            tp, field = typing.get_args(tp)[1], None
        else:
            break
    return parts, tp, field, section


def _at(data: Any, parts: list[str]) -> Any:
    for part in parts:
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


def _shipped_example(key: str, app: str, choices: Mapping[str, str]) -> str:
    """``; e.g. KEY=VALUE (configs/FILE)``: the key's value in a file this run selected."""
    group, _, rest = key.partition(".")
    files = [(f"experiment/{choices['experiment']}.yaml", key)] if "experiment" in choices else []
    files += [(f"{group}/{choices[group]}.yaml", rest)] if group in choices and rest else []
    files += [(f"{app}.yaml", key), ("suite.yaml", key)]
    for name, path in files:
        file = CONFIG_DIR / name
        value = _at(OmegaConf.to_container(OmegaConf.load(file)), path.split(".")) \
            if file.is_file() else None  # fmt: skip
        if value is not None and not isinstance(value, dict | list) and "${" not in str(value):
            return f"; e.g. {key}={_show(value)} (configs/{name})"
    return ""


def line(error: Any, app: str, data: Any, choices: Mapping[str, str]) -> tuple[str, str]:
    """(the key, one line naming it, its value, what is allowed and a fix) for one
    pydantic error."""
    parts, tp, field, section = walk(SCHEMAS[app], error["loc"])
    key = ".".join(parts)
    value = _at(data, parts)
    kind = error["type"]
    if kind == "cross":
        return key, error["msg"]
    if kind == "extra_forbidden":
        parent, _, leaf = key.rpartition(".")
        siblings = list(section.model_fields) if section else []
        hint = _suggest(leaf, siblings)
        hint = hint.replace("mean ", f"mean {parent}.") if parent else hint
        where = f"{parent} has" if parent else "the top level has"
        return key, (
            f"{key}={_show(value)}: experiments.{app} has no setting {key}, so nothing would "
            f"read it{hint} ({where}: {', '.join(siblings)})"
        )
    metadata = field.metadata if field is not None and tp is field.annotation else []
    allowed = describe(tp, metadata)
    hint = ""
    if kind == "choice":
        allowed = "one of " + ", ".join(error["ctx"]["choices"])
        hint = _suggest(value, error["ctx"]["choices"])
    elif kind == "shape":
        allowed = error["msg"]
    elif isinstance(value, str) and typing.get_origin(tp) is typing.Literal:
        hint = _suggest(value, typing.get_args(tp))
    what = f" ({field.description})" if field is not None and field.description else ""
    if kind == "missing":
        return key, f"{key}: missing; experiments.{app} needs it ({allowed}{what})"
    example = hint or _shipped_example(key, app, choices)
    return key, f"{key}={_show(value)}: expected {allowed}{what}{example}"


def fairseq_line(program: str, error: str, keys: list[str]) -> str:
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
