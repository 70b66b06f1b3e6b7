"""Turning a trained adapter into a standalone model."""

from mftune.export.merge import merge_adapter

__all__ = ["merge_adapter"]
