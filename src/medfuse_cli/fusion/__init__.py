"""Fusion methods: classic rules (and, in later issues, networks) behind one registry."""

from .classic import CLASSIC_RULES, fuse_classic

__all__ = ["CLASSIC_RULES", "fuse_classic"]
