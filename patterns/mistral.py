"""Mistral (`model_type="mistral"`): the same decoder layer as Llama."""

from patterns import norms  # noqa: F401  (registers the patterns named below)
from rewriter.registry import register_architecture

register_architecture("mistral", ["rmsnorm"])
