"""Which experiments and group options an app can select, read from the config files.

An experiment's app is its ``registry.app`` (:mod:`experiments.core.registry`); a data or
model option's app is its ``kind:``; an option without ``kind:`` (normaliser, logger, ...)
serves every app that composes its group.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.core import registry
from experiments.core.io import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs"
NOT_GROUPS = ("experiment", "experiment_profile")  # selected through experiment=NAME


def _defaults(name: str, config_dir: Path) -> list:
    return list(OmegaConf.load(config_dir / f"{name}.yaml").get("defaults", []))


def app_groups(app: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The config groups an app composes (its primary config's and suite's defaults)."""
    groups: list[str] = []
    for name in ("suite", app):
        for item in _defaults(name, config_dir):
            if not isinstance(item, DictConfig):
                continue
            for key in item:
                group = str(key).removeprefix("optional ").removeprefix("override ")
                group = group.split("@")[0].strip()
                if "/" not in group and group not in NOT_GROUPS:
                    groups.append(group)
    return list(dict.fromkeys(groups))


@cache
def kind_of(group: str, option: str, config_dir: Path = CONFIG_DIR) -> str | None:
    """The app a group option names in ``kind:`` (None: any app's)."""
    path = config_dir / group / f"{option}.yaml"
    kind = OmegaConf.load(path).get("kind") if path.is_file() else None
    return None if kind is None else str(kind)


def group_options(group: str, app: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The options of ``group`` the app may select, in file-name order."""
    every = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
    return [o for o in every if kind_of(group, o, config_dir) in (None, app)]


def app_experiments(app: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The app's experiments, its default one (primary config's defaults) first."""
    mine = list(registry.experiments_of(app, config_dir))
    default = next(
        (str(item["experiment"]) for item in _defaults(app, config_dir)
         if isinstance(item, DictConfig) and "experiment" in item),
        None,
    )  # fmt: skip
    return sorted(mine, key=lambda name: name != default)
