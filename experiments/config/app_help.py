"""``python -m experiments.<app> --help``: what the app runs, then its composed config.

``hydra.help.template`` (``configs/suite.yaml``) calls ``${app_help:<app>,<summary>}``, the
summary being the app's ``hydra.help.header`` (``configs/<app>.yaml``); every app imports
this module, so the resolver is there before Hydra prints ``--help``.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from experiments.config import options


def help_text(app: str, summary: str) -> str:
    """The help page (``$CONFIG`` is filled in by Hydra)."""
    lines = [
        f"python -m experiments.{app} [group=option ...] [key=value ...] [-m for a sweep]",
        "",
        summary,
        "",
        "== Choices (group=option) ==",
    ]
    experiments = options.app_experiments(app)
    if experiments:
        lines.append(f"  experiment: {', '.join(experiments)}   (configs/experiment/)")
    for group in options.app_groups(app):
        lines.append(f"  {group}: {', '.join(options.group_options(group, app))}")
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


if not OmegaConf.has_resolver("app_help"):
    OmegaConf.register_new_resolver("app_help", help_text)
