"""Qwen2 (`model_type="qwen2"`): Llama's decoder layer with biases on q, k and v, so Llama's
patterns. The fused LoRA nodes add a base layer's bias; a layer with a sliding window gets
HF's sliding-window mask, which the attention reads as it does Mistral's."""

from patterns.llama import PATTERNS
from rewriter.registry import register_architecture

register_architecture("qwen2", PATTERNS)
