"""Capture: TorchDynamo turns a Python forward into torch.fx graphs, handed to a backend of ours.

No AOTAutograd: the backend receives the Dynamo graph (torch-level ops, parameters lifted to
placeholders), rewrites it and returns a callable that runs it eagerly, so autograd flows
through our custom Functions exactly as through the original ops.
"""

from __future__ import annotations

import functools
import itertools
import sys
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
    backward: the split is turned off for calls made inside a DDP forward, and only there (on the
    8B model with a traced attention mask, patching Dynamo's config around every call changed
    the captured graph's gradients by 1.3 relative; unexplained, benchmarks/RESULTS.md)."""
    compiled = torch.compile(unique_entry(fn, label), backend=backend, dynamic=None)

    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.nn.parallel.DistributedDataParallel._get_active_ddp_module() is None:
            return compiled(*args, **kwargs)
        with torch._dynamo.config.patch(optimize_ddp=False):
            return compiled(*args, **kwargs)

    return run


# True during a graft call whose batch eager HF would run without an attention mask; the mask
# builders' wrappers read it while Dynamo traces them, so it is guarded: a batch that needs a
# mask (padding) compiles the graph that builds one.
SKIP_MASKS = False
# The builders whose skip rule eager_skips_mask follows (others, e.g. with extra mask functions
# for image tokens, are left alone).
_SKIPPABLE_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")


def wrap_mask_builders(model: torch.nn.Module) -> list[str]:
    """Wrap the attention-mask builders the model's code calls (transformers.masking_utils'
    causal and sliding-window builders) so that, traced during a graft call whose batch eager HF
    would run without a mask, they return None as eager does (SDPA then runs is_causal).

    Why: eager HF skips the causal mask after a data-dependent check (no padding, one sequence);
    traced, it cannot, and materialises the mask. SDPA then takes its slower masked path, and on
    the 8B model (transformers 5.17, torch 2.11) that graph's LoRA gradients differed from
    eager's by 5.9e-2 relative against a run-to-run spread of 1.3e-2 (benchmarks/RESULTS.md,
    third session). The decision is made before the call, in eager code (eager_skips_mask).
    Returns the names wrapped, now or by an earlier model (outside graft's calls they pass through)."""
    wrapped = []
    for module in {sys.modules.get(type(m).__module__) for m in model.modules()} - {None}:
        for name, fn in list(vars(module).items()):
            if name not in _SKIPPABLE_BUILDERS:
                continue
            if getattr(fn, "__module__", "") == "transformers.masking_utils":
                setattr(module, name, _eager_skip(fn))
            elif getattr(fn, "__module__", "") != __name__:  # neither HF's nor ours (an earlier model's)
                continue
            wrapped.append(f"{module.__name__}.{name}")
    return wrapped


def _eager_skip(build: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(build)
    def build_mask(*args: Any, **kwargs: Any) -> Any:
        # Only while Dynamo traces (the flag is then part of the graph's guards): code running
        # eagerly meanwhile, e.g. another thread's model, always gets HF's own builder. Extra
        # mask functions (image tokens, custom patterns) stop eager from skipping too.
        extra = kwargs.get("or_mask_function") is not None or kwargs.get("and_mask_function") is not None
        if SKIP_MASKS and not extra and torch.compiler.is_compiling():
            return None
        return build(*args, **kwargs)

    build_mask.__module__ = __name__  # wrapped once: a second model finds ours, not HF's
    return build_mask


def eager_skips_mask(config: Any, kwargs: dict[str, Any]) -> bool:
    """Would eager HF (SDPA attention) run this training batch without a mask? Only in the plain
    case, decided conservatively: no position_ids (packed sequences), no cache, a sequence
    shorter than any sliding window, and an attention_mask that is absent or all ones (one
    host sync, as eager's own check)."""
    ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if getattr(config, "_attn_implementation", None) != "sdpa" or ids is None:
        return False
    if kwargs.get("position_ids") is not None or kwargs.get("past_key_values") is not None:
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and ids.shape[1] >= window:
        return False
    mask = kwargs.get("attention_mask")
    return mask is None or (torch.is_tensor(mask) and mask.dim() == 2 and bool(mask.all()))


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
