"""Pattern files: one per op family (norms, ...) and one per architecture (llama, mistral).

Importing this package registers the built-in patterns and architectures."""

from patterns import llama, mistral  # noqa: F401
