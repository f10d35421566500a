"""CUDA graphs: a rewritten graph's forward and backward replayed as two captured CUDA graphs.

Why: at 4096 tokens the 8B QLoRA step was host-bound: the host needed ~245 ms to issue ~270 ms
of GPU work (Python, autograd, a few thousand kernel launches). Replayed, a step costs the host
two graph launches and the copy of the new batch into the graph's inputs; measured on the H200
(benchmarks/RESULTS.md, fourth session) the checkpointed step went from 422 to 386 ms. Training
shapes are static and our nodes never sync with the host, so a step can be captured and replayed.

When (else the graph runs eagerly, and the report says why): the graph draws no random numbers
(dropout), its inputs are CUDA tensors and ints (an int is fixed per capture; Dynamo's guards
fix the tensors' dtypes, devices, requires_grad and static sizes), no autocast, torch.distributed
not initialized (DDP and FSDP overlap gradient communication with backward through per-parameter
hooks; a replayed backward hands every gradient over at its end), and the same graph and ints on
two calls in a row: the first runs eagerly, so Triton has compiled and cuBLAS has chosen its
algorithms before the capture. One capture per graph is kept; a new signature releases the old.

Capture and check: the eager allocator's cached blocks are released first (the graph's private
pool takes the step's activations; both would otherwise stay reserved), the forward is captured,
then the backward as torch.autograd.grad of the outputs with respect to every input that needs
a gradient, into the same pool. The first replay's outputs are compared with an eager forward of
the same batch (no_grad); if they differ beyond the loss bound of their dtype the capture is
dropped and the graph runs eagerly from then on (a fallback in the report).

What a replay keeps safe:
- Inputs that were the very same tensors on the call before the capture (parameters, buffers,
  quantization states) are read in place, and a replay checks they still have that storage
  (else it captures again); the others (the batch) are copied into buffers of the capture's
  own, so a caller's tensors are never written.
- Outputs and gradients are returned as fresh clones: a later replay never changes a tensor a
  caller holds, nor a gradient being accumulated over several steps.
- Activations live in the pool until backward. While a replayed forward waits for its backward,
  another forward runs eagerly (e.g. two forwards before one backward); a backward through a
  step that a later replay has overwritten raises instead of returning wrong gradients.

Early launch: the host's work before a replay (the training call's own checks, Dynamo's guards
and its list of 1,638 inputs) leaves the GPU idle after each step's loss sync. So the session
asks the replayer that ran last to `speculate` on the call's named inputs as soon as it enters:
the batch is copied in (by the call inputs the last replay read it from) and the forward graph
launched. When Dynamo then calls the graph, the replay is adopted only if every check a replay
makes passes and the batch inputs are the very tensors copied, unmodified (same version);
otherwise it is discarded (after waiting for it, so nothing reuses its memory under it) and the
call runs as it would have. A launch is never a result: Dynamo's guards still decide.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from rewriter.checkpoint import draws_random_numbers

Signature = tuple[Any, ...]
_CLOCK = itertools.count(1)


def why_not(fn: Callable[..., Any], args: Sequence[Any]) -> str | None:
    """Why a call of this graph with these inputs cannot be replayed (None if it can). The answer
    holds for every call of one signature (Dynamo guards the devices); the process state, which
    can change between calls, is _why_not_now's."""
    graphs = [m for m in fn.modules() if isinstance(m, torch.fx.GraphModule)] if isinstance(fn, torch.nn.Module) else []
    if any(draws_random_numbers(list(g.graph.nodes)) for g in graphs):
        # our LoRA dropout saves the generator state on the host to replay its mask in backward;
        # a capture would fix that state, and every replay's backward would use a stale mask
        return "the graph draws random numbers (dropout)"
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    odd = {type(a).__name__ for a in args if not isinstance(a, (torch.Tensor, int))}
    if odd:
        return f"a graph input is a {', '.join(sorted(odd))} (only tensors and ints are fixed per capture)"
    if not tensors or not all(t.is_cuda for t in tensors):
        return "the graph's inputs are not all on a CUDA device"
    if len({t.device for t in tensors}) > 1:
        return "the graph's inputs are on several devices"
    return None


def _why_not_now() -> str | None:
    """The process state that rules replay out for this call."""
    if torch.is_autocast_enabled("cuda"):
        return "autocast is on"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return (
            "torch.distributed is initialized (DDP/FSDP overlap gradient communication with backward "
            "per parameter; a replayed backward returns every gradient at its end)"
        )
    return None


def signature(fn: Callable[..., Any], args: Sequence[Any]) -> Signature:
    """What a capture is valid for: the graph and its int inputs. Dynamo's guards already fix
    every tensor input's dtype, device, requires_grad and static sizes and strides, and pass each
    dynamic size as an int input."""
    return (id(fn), *(a for a in args if not isinstance(a, torch.Tensor)))


@dataclass(eq=False)
class _Capture:
    forward_graph: torch.cuda.CUDAGraph
    backward_graph: torch.cuda.CUDAGraph
    positions: list[int]  # which graph inputs are tensors (the others are ints, fixed)
    inputs: list[torch.Tensor]  # the captured graph reads these
    copied: list[int]  # indices into inputs: buffers of the capture's own, refilled every replay
    outputs: list[Any]  # flat outputs of the captured forward (tensors or constants)
    spec: pytree.TreeSpec
    grad_outputs: list[torch.Tensor | None]  # backward reads the incoming gradients here
    grad_inputs: list[torch.Tensor | None]  # and writes the inputs' gradients here
    mutates_inputs: bool  # the forward writes an input in place: never launched early
    generation: int = 0  # forward replays so far
    pending: bool = False  # a replayed forward waits for its backward

    def __post_init__(self) -> None:
        copied = set(self.copied)
        self.in_place = [i for i in range(len(self.inputs)) if i not in copied]
        self.in_place_ptrs = [self.inputs[i].data_ptr() for i in self.in_place]
        # what goes through the autograd Function: the batch (copied in) and what needs a
        # gradient; the other 1,188 inputs of Llama-8B (quantization states, frozen weights)
        # would only cost the Function's per-input bookkeeping (~0.4 ms a step)
        self.through = sorted(copied | {i for i, x in enumerate(self.inputs) if x.requires_grad})
        self.copy_in = [(k, i) for k, i in enumerate(self.through) if i in copied]

    def reads_in_place(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Do the inputs the graph reads in place still have the storage it captured?"""
        return [tensors[i].data_ptr() for i in self.in_place] == self.in_place_ptrs


class _Token:
    """Lives as long as one replayed step's autograd graph (dropped without backward: not pending)."""


@dataclass(eq=False)
class _Launch:
    """A forward replay launched ahead of its call (module docstring, early launch)."""

    batch: list[torch.Tensor]  # the call's tensors copied in, by capture.copied
    versions: list[int]
    done: torch.cuda.Event

    def matches(self, capture: _Capture, tensors: Sequence[torch.Tensor]) -> bool:
        inputs = [tensors[i] for i in capture.copied]
        return all(a is b and a._version == v for a, b, v in zip(inputs, self.batch, self.versions))


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, capture: _Capture, launched: bool, *inputs: torch.Tensor):
        if not launched:
            for k, i in capture.copy_in:  # inputs: the capture's `through` inputs
                capture.inputs[i].copy_(inputs[k])
            capture.forward_graph.replay()
        capture.generation += 1
        capture.pending = True
        ctx.capture, ctx.generation = capture, capture.generation
        ctx.token = _Token()
        weakref.finalize(ctx.token, _dropped, weakref.ref(capture), capture.generation)
        ctx.set_materialize_grads(False)
        outs = [o.clone() for o in capture.outputs if isinstance(o, torch.Tensor)]
        ctx.mark_non_differentiable(*[o for o, s in zip(outs, _tensors(capture.outputs)) if not s.requires_grad])
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        capture = ctx.capture
        if ctx.generation != capture.generation or not capture.pending:
            raise RuntimeError(
                "graft: backward through a step replayed from a CUDA graph whose activations a later "
                "step has overwritten (or a second backward); pass cuda_graphs=False to optimize()"
            )
        for static, g in zip(capture.grad_outputs, grads):
            if static is None:
                continue
            if g is None:
                static.zero_()
            elif static.data_ptr() != g.data_ptr():
                static.copy_(g)
        capture.backward_graph.replay()
        capture.pending = False
        # copies: autograd would adopt a returned buffer as a parameter's .grad, and the next
        # replay would then overwrite gradients being accumulated
        return (None, None, *_fresh_copies([capture.grad_inputs[i] for i in capture.through]))


def _wait(launch: _Launch | None) -> None:
    """A discarded early launch: wait for it before its pool or inputs are used again."""
    if launch is not None:
        launch.done.synchronize()


def _fresh_copies(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Copies of the graph's gradient buffers, as views of one new buffer per dtype filled by
    one multi-tensor copy: a few launches instead of one per parameter (449 on Llama-8B,
    ~3 ms of host time a step). autograd adopts each view as that parameter's .grad."""
    copies: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None and t.is_contiguous():
            groups.setdefault(t.dtype, []).append(i)
        elif t is not None:
            copies[i] = t.clone()
    for dtype, members in groups.items():
        flat = torch.empty(sum(tensors[i].numel() for i in members), dtype=dtype, device=tensors[members[0]].device)
        views = [v.view(tensors[i].shape) for i, v in zip(members, flat.split([tensors[i].numel() for i in members]))]
        torch._foreach_copy_(views, [tensors[i] for i in members])
        for i, v in zip(members, views):
            copies[i] = v
    return copies


def _dropped(capture_ref: weakref.ref, generation: int) -> None:
    capture = capture_ref()
    if capture is not None and capture.generation == generation:
        capture.pending = False


def _tensors(values: Sequence[Any]) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor)]


class Replayer:
    """Runs `fn(*args)` (a rewritten graph) eagerly or from its captured CUDA graphs (module
    docstring). `status(line, failure)` is told what happens, for the report."""

    def __init__(
        self,
        status: Callable[[str, bool], None],
        loss_bounds: dict[torch.dtype, float],
        call_inputs: Callable[[], Mapping[str, Any]] = dict,
    ):
        self.status, self.loss_bounds = status, loss_bounds
        self.call_inputs = call_inputs  # the named inputs of the training call in progress
        self.batch_keys: list[str] | None = None  # which call input each copied input was, last replay
        self.launch: _Launch | None = None
        self.replayed_at = 0  # _CLOCK at this replayer's last replay (the session launches early on the latest)
        self.capture: _Capture | None = None
        self.captured_signature: Signature | None = None
        self.last_signature: Signature | None = None
        self.last_inputs: list[weakref.ref] = []  # the previous call's tensor inputs
        self.eligible: dict[Signature, str | None] = {}
        self.disabled: str | None = None
        self.calls = 0

    def __call__(self, fn: Callable[..., Any], args: Sequence[Any]) -> Any:
        self.calls += 1
        sig = signature(fn, args)
        if sig not in self.eligible:
            self.eligible[sig] = why_not(fn, args)
        why = self.disabled or self.eligible[sig] or _why_not_now()
        launch, self.launch = self.launch, None
        c = self.capture if why is None and sig == self.captured_signature else None
        tensors = [args[i] for i in c.positions] if c is not None and not c.pending else None
        replayable = tensors is not None and c.reads_in_place(tensors)
        launched = replayable and launch is not None and launch.matches(c, tensors)
        if not launched:
            _wait(launch)
        if why is not None:
            self.status(f"off: {why}", False)
            return fn(*args)
        if replayable:
            return self._replay(tensors, launched)
        if tensors is not None:
            self.release()  # a parameter or constant input moved: capture again
        seen_before, self.last_signature = self.last_signature == sig, sig
        previous, self.last_inputs = self.last_inputs, [weakref.ref(a) for a in args if isinstance(a, torch.Tensor)]
        # first call of this signature, or a replayed forward waits for its backward
        if not seen_before or (self.capture is not None and self.capture.pending):
            return self._eager(fn, args, sig)
        self.release()
        return self._capture_and_check(fn, args, sig, [r() for r in previous])

    def release(self) -> None:
        """Drop the capture (its pool is freed with it)."""
        _wait(self.launch)
        self.launch = self.batch_keys = None
        if self.capture is not None:
            self.capture = self.captured_signature = None
            torch.cuda.empty_cache()

    def speculate(self, named: Mapping[str, Any]) -> None:
        """Launch the captured forward on this call's batch now, before Dynamo's guards (module
        docstring); __call__ adopts it or discards it."""
        c, keys = self.capture, self.batch_keys
        if c is None or c.pending or c.mutates_inputs or keys is None or self.disabled or _why_not_now() is not None:
            return  # (an early launch that writes an input would write it twice when discarded)
        _wait(self.launch)
        self.launch = None
        batch = [named.get(key) for key in keys]
        statics = [c.inputs[i] for i in c.copied]
        if not all(
            isinstance(t, torch.Tensor) and t.shape == s.shape and t.dtype == s.dtype and t.device == s.device
            for t, s in zip(batch, statics)
        ):
            return
        for s, t in zip(statics, batch):
            s.copy_(t)
        c.forward_graph.replay()
        done = torch.cuda.Event()
        done.record()
        self.launch = _Launch(batch, [t._version for t in batch], done)

    def _replay(self, tensors: Sequence[torch.Tensor], launched: bool = False) -> Any:
        c = self.capture
        if not launched:  # learn where the batch comes from, for the next call's early launch
            named = self.call_inputs()
            keys = [next((k for k, v in named.items() if v is tensors[i]), None) for i in c.copied]
            self.batch_keys = keys if None not in keys else None
        self.replayed_at = next(_CLOCK)
        outs = iter(_Replay.apply(c, launched, *[tensors[i] for i in c.through]))
        flat = [next(outs) if isinstance(o, torch.Tensor) else o for o in c.outputs]
        return pytree.tree_unflatten(flat, c.spec)

    def _eager(self, fn: Callable[..., Any], args: Sequence[Any], sig: Signature) -> Any:
        """An eager call before any capture of this signature; a graph seen writing one of its
        inputs is never captured: the capture's check run and its replay would each apply the
        write once more (the reason goes to the report)."""
        tensors = _tensors(args)
        versions = [t._version for t in tensors]
        out = fn(*args)
        if any(t._version != v for t, v in zip(tensors, versions)):
            self.eligible[sig] = "the graph writes one of its inputs in place (a buffer updated in forward)"
        return out

    def _capture_and_check(self, fn: Callable[..., Any], args: Sequence[Any], sig: Signature, previous: list) -> Any:
        with torch.no_grad():
            reference = [t.detach().clone() for t in _tensors(pytree.tree_leaves(fn(*args)))]
        try:
            self.capture, self.captured_signature = _capture(fn, args, previous), sig
        except Exception as exc:  # e.g. a host sync inside the graph: run eagerly from now on
            self.capture = self.captured_signature = None
            torch.cuda.empty_cache()
            self.disabled = f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            self.status(f"off: {self.disabled}", True)
            return fn(*args)
        out = self._replay([args[i] for i in self.capture.positions])
        worst = _worst_difference(reference, _tensors(pytree.tree_leaves(out)), self.loss_bounds)
        if worst is not None:
            self.release()
            self.disabled = f"the first replay differed from eager ({worst})"
            self.status(f"off: {self.disabled}", True)
            return fn(*args)
        c = self.capture
        copied = sum(c.inputs[i].numel() * c.inputs[i].element_size() for i in c.copied)
        self.status(
            f"on: forward and backward replayed, captured at call {self.calls}; "
            f"{len(c.copied)} of {len(c.inputs)} inputs copied in per step ({copied / 2**20:.2f} MiB)",
            False,
        )
        return out


def _capture(fn: Callable[..., Any], args: Sequence[Any], previous: Sequence[Any]) -> _Capture:
    """Inputs that were the very same tensors in the previous call (parameters, buffers, quant
    states) are read in place; the others (the batch) get buffers of the capture's own, so a
    replay never writes a caller's tensor."""
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    inputs, copied = [], []
    for k, i in enumerate(positions):
        a = args[i]
        stable = k < len(previous) and previous[k] is a
        inputs.append((a.detach() if stable else a.detach().clone()).requires_grad_(a.requires_grad))
        if not stable:
            copied.append(k)
    full = list(args)
    for i, static in zip(positions, inputs):
        full[i] = static
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the eager step's cached blocks: the pool below takes their place
    pool = torch.cuda.graph_pool_handle()
    forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    versions = [x._version for x in inputs]
    with torch.cuda.graph(forward_graph, pool=pool, capture_error_mode="thread_local"):
        outputs, spec = pytree.tree_flatten(fn(*full))
    mutates_inputs = any(x._version != v for x, v in zip(inputs, versions))
    differentiable = [o for o in _tensors(outputs) if o.requires_grad]
    grad_outputs = [torch.empty_like(o) if o.requires_grad else None for o in _tensors(outputs)]
    wanted = [x for x in inputs if x.requires_grad]
    grads: Sequence[torch.Tensor | None] = [None] * len(wanted)
    if differentiable and wanted:
        with torch.cuda.graph(backward_graph, pool=pool, capture_error_mode="thread_local"):
            grads = torch.autograd.grad(
                differentiable, wanted, [g for g in grad_outputs if g is not None], allow_unused=True
            )
    it = iter(grads)
    grad_inputs = [next(it) if x.requires_grad else None for x in inputs]
    return _Capture(
        forward_graph,
        backward_graph,
        positions,
        inputs,
        copied,
        outputs,
        spec,
        grad_outputs,
        grad_inputs,
        mutates_inputs,
    )


def _worst_difference(
    reference: list[torch.Tensor], replayed: list[torch.Tensor], bounds: dict[torch.dtype, float]
) -> str | None:
    """A description of the first output beyond its bound, or None if all agree."""
    if len(reference) != len(replayed):
        return f"{len(replayed)} tensor outputs against {len(reference)}"
    for i, (a, b) in enumerate(zip(reference, replayed)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i}: {tuple(b.shape)} {b.dtype} against {tuple(a.shape)} {a.dtype}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i} differs"
            continue
        scale = a.double().norm().item()
        diff = (a.double() - b.double()).norm().item()
        rel = diff / scale if scale > 0 else diff
        bound = bounds.get(a.dtype, min(bounds.values()))
        if not rel <= bound:
            return f"output {i}: relative difference {rel:.1e} > {bound:.0e}"
    return None
