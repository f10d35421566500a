"""Which patterns exist, and which apply to which `model_type`.

Pattern files under `patterns/` (and a user's own) call into this registry. Op-family files (`norms.py`, ...) register patterns; architecture files (`llama.py`, ...)
list, in order, the patterns that apply to a model type. Order matters: a node replaced by
an earlier pattern is not offered to a later one, so larger patterns come first."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from rewriter.match import Pattern

_PATTERNS: dict[str, Pattern] = {}
_ARCHITECTURES: dict[str, list[str]] = {}


def register_pattern(pattern: Pattern, *, model_types: Iterable[str] = ()) -> Pattern:
    """Make `pattern` known by name; with model_types, apply it to those architectures ahead
    of the built-in patterns (a user's pattern wins where both would match)."""
    _PATTERNS[pattern.name] = pattern
    for model_type in model_types:
        names = _ARCHITECTURES.setdefault(model_type, [])
        if pattern.name not in names:
            names.insert(0, pattern.name)
    return pattern


def register_architecture(model_type: str, pattern_names: Sequence[str]) -> None:
    """The ordered pattern set for a Hugging Face `config.model_type`."""
    _ARCHITECTURES[model_type] = list(pattern_names)


def register_pattern_file(path: str | Path) -> None:
    """Load a pattern file of your own (it calls register_pattern / register_architecture)."""
    path = Path(path).resolve()
    name = f"graft_user_patterns_{path.stem}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load pattern file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def pattern_named(name: str) -> Pattern:
    if name not in _PATTERNS:
        raise KeyError(f"no pattern named {name!r}; known: {sorted(_PATTERNS)}")
    return _PATTERNS[name]


def patterns_for(model_type: str) -> list[Pattern] | None:
    """The pattern set of an architecture, or None when no pattern file covers it."""
    names = _ARCHITECTURES.get(model_type)
    return None if names is None else [pattern_named(n) for n in names]


def architectures() -> list[str]:
    return sorted(_ARCHITECTURES)
