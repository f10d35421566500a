"""Capture: TorchDynamo turns a Python forward into torch.fx graphs, handed to a backend of ours.

No AOTAutograd: the backend receives the Dynamo graph (torch-level ops, parameters lifted to
placeholders), rewrites it and returns a callable that runs it eagerly, so autograd flows
through our custom Functions exactly as through the original ops.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

Backend = Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]]

_entry_ids = itertools.count()


def unique_entry(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    """A trampoline to `fn` with a code object of its own.

    Dynamo keys its cache, and its recompile limit, on the code object of the frame it
    compiles. Compiling a model's bound `forward` directly would share one code object among
    every model of that class in the process; past the limit (8) Dynamo silently runs the
    original code. A fresh code object per optimized model keeps their caches apart."""

    def graft_entry(*args, **kwargs):
        return fn(*args, **kwargs)

    name = f"graft_entry_{label}_{next(_entry_ids)}"
    renamed = {"co_name": name}
    if hasattr(graft_entry.__code__, "co_qualname"):  # Python >= 3.11
        renamed["co_qualname"] = name
    code = graft_entry.__code__.replace(**renamed)
    return types.FunctionType(code, graft_entry.__globals__, name, None, graft_entry.__closure__)


def compile_with(fn: Callable[..., Any], backend: Backend, label: str) -> Callable[..., Any]:
    """Dynamo capture with our backend. Automatic dynamic shapes: the first call compiles a
    static graph, a second distinct shape one dynamic graph that serves every later length.

    Under DistributedDataParallel, Dynamo would split the graph at DDP's gradient-bucket
    boundaries (its "DDP optimizer", for compiled backward graphs) and hand us the pieces:
    patterns across a boundary would not match, and small first buckets make it raise. Our
    graph runs eagerly, so DDP's own per-parameter hooks already overlap the all-reduce with
    backward: the split is turned off for our calls."""
    compiled = torch.compile(unique_entry(fn, label), backend=backend, dynamic=None)

    def run(*args: Any, **kwargs: Any) -> Any:
        if not DDP_SPLIT_OFF:
            return compiled(*args, **kwargs)
        with torch._dynamo.config.patch(optimize_ddp=False):
            return compiled(*args, **kwargs)

    return run


DDP_SPLIT_OFF = True
EAGER_MASKS = False


def masks_run_eagerly(model: torch.nn.Module) -> list[str]:
    """Run the mask builders (transformers.masking_utils.create_*mask*) that the model's
    modules call outside the captured graph, as eager code, so the graph receives exactly the
    mask eager HF would use (None where eager skips it). Returns the wrapped names."""
    import sys

    wrapped = []
    for module in {sys.modules.get(type(m).__module__) for m in model.modules()} - {None}:
        for name, fn in list(vars(module).items()):
            if (
                name.startswith("create_")
                and "mask" in name
                and callable(fn)
                and getattr(fn, "__module__", "") == "transformers.masking_utils"
                and not getattr(fn, "_graft_eager", False)
            ):
                eager = torch._dynamo.disable(fn, recursive=True)
                eager._graft_eager = True
                setattr(module, name, eager)
                wrapped.append(f"{module.__name__}.{name}")
    return wrapped


def trace(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[torch.fx.GraphModule, list[Any]]:
    """One static, whole graph of `fn(*args)`, captured exactly as a model is (for patterns)."""
    captured: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: list[Any]):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    compiled = torch.compile(unique_entry(fn, "pattern"), backend=keep, dynamic=False, fullgraph=True)
    compiled(*args)
    (gm, example_inputs), *rest = captured
    if rest:
        raise RuntimeError(f"tracing {fn!r} produced {len(captured)} graphs; a pattern must be one graph")
    return gm, example_inputs


def graph_break_reasons() -> dict[str, int]:
    """Dynamo's running tally of graph-break reasons (process-wide)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - private API moved
        return {}
    return dict(counters.get("graph_break", {}))
