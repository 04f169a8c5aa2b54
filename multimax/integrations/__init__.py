"""Thin adapters that plug the normalisers into other frameworks.

- ``multimax.integrations.timm``: registers the DeiT-GAP models with timm's model registry.
- ``multimax/integrations/fairseq_plugin``: a fairseq ``--user-dir``.
"""
