"""Llama (`model_type="llama"`): the patterns that apply, larger first."""

from patterns import activations, lora, loss, norms, rope  # noqa: F401  (registers the patterns named below)
from rewriter.registry import register_architecture

PATTERNS = [
    "rmsnorm_lora_mlp",
    "rmsnorm_lora_qkv",
    "lora_mlp",
    "lora_qkv",
    "lora_o",
    "lora_linear",
    "rmsnorm",
    "rope",
    "swiglu",
    "linear_cross_entropy",
]
register_architecture("llama", PATTERNS)
