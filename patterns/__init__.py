"""Pattern files: one per op family (norms, ...) and one per architecture (llama, mistral, qwen2).

Importing this package registers the built-in patterns and architectures."""

from patterns import llama, mistral, qwen2  # noqa: F401
