"""Tests run every Triton kernel through Triton's interpreter on the CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import rewriter.registry  # noqa: E402


@pytest.fixture
def clean_registry():
    """Undo pattern registrations a test makes."""
    saved_patterns = dict(rewriter.registry._PATTERNS)
    saved_archs = {k: list(v) for k, v in rewriter.registry._ARCHITECTURES.items()}
    yield
    rewriter.registry._PATTERNS.clear()
    rewriter.registry._PATTERNS.update(saved_patterns)
    rewriter.registry._ARCHITECTURES.clear()
    rewriter.registry._ARCHITECTURES.update(saved_archs)
