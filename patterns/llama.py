"""Llama (`model_type="llama"`): the patterns that apply, larger first."""

from patterns import norms  # noqa: F401  (registers the patterns named below)
from rewriter.registry import register_architecture

register_architecture("llama", ["rmsnorm"])
