"""Hydra composition of the project's configs from tests, beside in-process fairseq."""

from __future__ import annotations

import contextlib
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from experiments.core.io import REPO_ROOT

CONFIGS = str(REPO_ROOT / "configs")


@contextlib.contextmanager
def without_fairseq_schemas():
    """Importing fairseq (other tests of this session do) stores its schemas in Hydra's
    ConfigStore (``common``, ``model/transformer_lm``, ...), which shadow our config files of
    the same names; hide them while composing. Our apps never import fairseq in-process."""
    from hydra.core.config_store import ConfigStore

    ours = {p.name.removesuffix(".yaml") for p in Path(CONFIGS).iterdir()}
    repo = ConfigStore.instance().repo
    hidden = {k: repo.pop(k) for k in list(repo) if k.removesuffix(".yaml") in ours}
    try:
        yield
    finally:
        repo.update(hidden)


def compose(app: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    """The app's composed config (``language_model``, ``translation``, ...), as the app sees
    it (``hydra``: with Hydra's own node, e.g. its group choices); Hydra's process-wide
    version base is left as it was (fairseq needs its own)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.version import VersionBase

    version = VersionBase.instance()
    saved = version.version_base
    try:
        with (
            without_fairseq_schemas(),
            initialize_config_dir(config_dir=CONFIGS, version_base="1.3"),
        ):
            return hydra_compose(config_name=app, overrides=overrides, return_hydra_config=hydra)
    finally:
        version.version_base = saved
        GlobalHydra.instance().clear()
