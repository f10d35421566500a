"""Mistral (`model_type="mistral"`): the same decoder layer as Llama, so the same patterns."""

from patterns.llama import PATTERNS
from rewriter.registry import register_architecture

register_architecture("mistral", PATTERNS)
