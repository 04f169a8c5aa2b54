"""Data preparation, one home for the apps and the ``scripts/prepare_*.py`` command lines.

Imports run one way: ``scripts`` → ``experiments`` (this package included) → ``multimax``.
"""
