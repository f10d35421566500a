"""Verify: every replacement against the float64 run of the subgraph it replaces.

Each match is checked on the real values its subgraph saw in the sample. Three runs of the
same inputs and the same output cotangents: the original subgraph in the model's dtype
(eager), the original subgraph in float64 (the judge: every float tensor and every floating
dtype constant promoted), and the replacement. For each output and each gradient (inputs,
trainable parameters) the replacement passes when

    err(ours) <= ERROR_FACTOR * err(eager) + SLACK * unit_roundoff(dtype)

with err(t) = ||t - t64|| / ||t64||. The slack only matters where eager happens to be exact.
Cost: one forward of the graph on the sample (no grad), each match checked as soon as its
inputs exist and its values dropped when no later match needs them, and three small
forward+backward runs per match; nothing of the whole model is promoted.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx import Node

from rewriter.match import Match, external_inputs

ERROR_FACTOR = 2.0
SLACK = 1 / 16

# Ops with no float64 kernel (bitsandbytes' 4-bit matmuls): target -> float64 equivalent.
FLOAT64_LOWERINGS: dict[Any, Callable[..., Any]] = {}
_TO_FLOAT64 = {torch.float16, torch.bfloat16, torch.float32}
_FLOAT_METHODS = {"float", "half", "bfloat16"}


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def relative_error(value: torch.Tensor | None, reference: torch.Tensor | None) -> float:
    if reference is None:
        return 0.0 if value is None or not value.any() else math.inf
    reference = reference.detach().double()
    if value is None:
        value = torch.zeros_like(reference)
    value = value.detach().double()
    if not torch.isfinite(value).all():
        return math.inf
    diff = (value - reference).norm().item()
    norm = reference.norm().item()
    return diff / norm if norm > 0 else diff


@dataclass
class Comparison:
    what: str  # "output 0", "grad hidden_states", ...
    ours: float
    eager: float
    dtype: str

    @property
    def bound(self) -> float:
        return ERROR_FACTOR * self.eager + SLACK * unit_roundoff(getattr(torch, self.dtype))

    @property
    def passed(self) -> bool:
        return self.ours <= self.bound


@dataclass
class MatchCheck:
    comparisons: list[Comparison] = field(default_factory=list)
    saved_bytes_eager: int = 0
    saved_bytes_ours: int = 0
    error: str | None = None  # an exception raised by the replacement

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.comparisons)

    @property
    def worst(self) -> Comparison | None:
        return max(self.comparisons, key=lambda c: c.ours / max(c.bound, 1e-30), default=None)


class _CheckingInterpreter(torch.fx.Interpreter):
    """Runs the original graph without grad and checks each match as soon as every value
    entering it exists, keeping a value only while a match still waiting needs it: what is
    alive at once is about one layer's values, not the sample's activations."""

    def __init__(self, gm: torch.fx.GraphModule, matches: list[Match], check: Callable[[Match, dict], MatchCheck]):
        super().__init__(gm)
        self.check, self.matches = check, matches
        self.inputs = [external_inputs(m) for m in matches]
        self.missing = [set(xs) for xs in self.inputs]
        self.waiting_on: dict[Node, set[int]] = {}
        for i, xs in enumerate(self.inputs):
            for x in xs:
                self.waiting_on.setdefault(x, set()).add(i)
        self.values: dict[Node, Any] = {}
        self.results: dict[int, MatchCheck] = {}

    def run_node(self, n: Node) -> Any:
        value = super().run_node(n)
        if n in self.waiting_on:
            self.values[n] = value
            for i in sorted(self.waiting_on[n]):
                self.missing[i].discard(n)
                if not self.missing[i]:
                    self._check(i)
        return value

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # The capture's grad-mode switches (HF's rotary embedding runs under no_grad, then
        # grad comes back on): the sample's run stays without grad, else autograd would keep
        # every layer's activations for a backward that never comes.
        if target is torch._C._set_grad_enabled:
            return None
        return super().call_function(target, args, kwargs)

    def _check(self, i: int) -> None:
        with torch.enable_grad():  # the graph runs under no_grad; the checks differentiate
            self.results[i] = self.check(self.matches[i], self.values)
        for x in self.inputs[i]:
            self.waiting_on[x].discard(i)
            if not self.waiting_on[x]:
                del self.waiting_on[x]
                self.values.pop(x, None)


def check_matches(
    gm: torch.fx.GraphModule, example_inputs: list[Any], matches: list[Match], names: dict[Node, str] | None = None
) -> list[MatchCheck]:
    """Run the original graph once (no grad) on the sample and check every match on the
    values entering it there (check_match); one result per match, in order."""
    interpreter = _CheckingInterpreter(gm, matches, lambda m, values: check_match(gm, m, values, names))
    for i, missing in enumerate(interpreter.missing):
        if not missing:  # a match of constants alone waits for nothing
            interpreter._check(i)
    with torch.no_grad():
        interpreter.run(*example_inputs)
    never = "its inputs were never computed in the sample's run"
    return [interpreter.results.get(i, MatchCheck(error=never)) for i in range(len(matches))]


def extract(gm: torch.fx.GraphModule, m: Match) -> tuple[torch.fx.GraphModule, list[Node]]:
    """The matched nodes as a GraphModule of their own, inputs first."""
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    inputs = external_inputs(m)
    for x in inputs:
        env[x] = graph.placeholder(x.name)
    for n in m.nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[o] for o in m.outputs))
    return torch.fx.GraphModule(gm, graph), inputs


def to_float64(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The same graph computing in float64: floating dtype constants promoted, `.float()`
    made `.double()`, ops without a float64 kernel lowered, grad-mode switches dropped (so
    autograd differentiates the judge end to end), and a traced autograd.Function
    (`autograd_function_apply`) replaced by its forward body, itself in float64."""
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    for n in gm.graph.nodes:
        new = graph.node_copy(n, env.__getitem__)
        new.args = _promote(new.args)
        new.kwargs = _promote(new.kwargs)
        if new.op == "call_method" and new.target in _FLOAT_METHODS:
            new.target = "double"
        if new.op == "call_function":
            if new.target is torch.nn.functional.dropout:
                new.target = _dropout_drawn_like(n.args[0].meta.get("example_value"))
            elif new.target in FLOAT64_LOWERINGS:
                new.target = FLOAT64_LOWERINGS[new.target]
            elif new.target is torch._C._set_grad_enabled:
                new.target = _no_op
            elif _is_hop(new.target, "autograd_function_apply"):
                new.target = _forward_body_in_float64
                new.kwargs = {}
        env[n] = new
    return torch.fx.GraphModule(gm, graph)


def _no_op(*args: Any) -> None:
    return None


def _dropout_drawn_like(eager: Any) -> Callable[..., torch.Tensor]:
    """Dropout in float64 with the mask the eager run draws: the generator consumes
    differently for other dtypes (CUDA vectorises by element size), so the mask is drawn on a
    tensor of the eager dtype, under the same generator state, and applied in float64."""
    dtype = eager.dtype if isinstance(eager, torch.Tensor) else torch.float32

    def dropout_like_eager(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
        if not training or p == 0:
            return x
        kept = torch.nn.functional.dropout(torch.ones(x.shape, dtype=dtype, device=x.device), p) != 0
        return x * kept / (1 - p)

    return dropout_like_eager


def _is_hop(target: Any, name: str) -> bool:
    return isinstance(target, torch._ops.HigherOrderOperator) and target.name() == name


def _forward_body_in_float64(fwd_body: torch.fx.GraphModule, bwd_body: Any, *args: Any) -> Any:
    outputs, _saved = to_float64(fwd_body)(*args)
    return outputs


def _promote(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return torch.float64 if value in _TO_FLOAT64 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_promote(v) for v in value)
    if isinstance(value, dict):
        return {k: _promote(v) for k, v in value.items()}
    return value


def _wants_grad(node: Node) -> bool:
    """Whether the model computes a gradient for this input: trainable parameters and
    activations that depend on them (as Dynamo recorded when it captured the graph)."""
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad


def _leaf(value: Any, wants_grad: bool, dtype: torch.dtype | None = None, copy: bool = False) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    t = value.detach().clone() if copy else value.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.requires_grad_(wants_grad)


@contextlib.contextmanager
def saved_tensor_meter(already_alive: list[Any]) -> Iterator[dict[int, int]]:
    """Bytes of new storage that autograd saves for backward inside the block."""
    alive = {t.untyped_storage().data_ptr() for t in already_alive if isinstance(t, torch.Tensor)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return t
        if storage.data_ptr() not in alive:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _cotangent(out: torch.Tensor, i: int, seed: int) -> torch.Tensor:
    """The same random output gradient for every run: bf16 values, exact in every float dtype
    we run (so the float64 judge and the eager run differentiate the same cotangent)."""
    gen = torch.Generator(device=out.device).manual_seed(seed + 1 + i)
    drawn = torch.randn(out.shape, dtype=torch.float32, device=out.device, generator=gen)
    return drawn.to(torch.bfloat16).to(torch.float64)


def _run(fn: Callable[..., Any], args: list[Any], grad_of: list[int], seed: int):
    """Forward under a fixed seed, then the gradients of the chosen inputs."""
    with torch.random.fork_rng(devices=_devices(args)):
        torch.manual_seed(seed)
        with saved_tensor_meter(args) as saved:
            outs = fn(*args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    cotangents = [_cotangent(o, i, seed) for i, o in enumerate(outs)]
    pairs = [(o, c.to(o.dtype)) for o, c in zip(outs, cotangents) if o.requires_grad]
    wrt = [args[i] for i in grad_of]
    grads: list[torch.Tensor | None] = [None] * len(wrt)
    if pairs and wrt:
        grads = list(torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True))
    return [o.detach() for o in outs], grads, sum(saved.values())


def _devices(args: list[Any]) -> list[torch.device]:
    return list({a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda})


def check_match(
    gm: torch.fx.GraphModule, m: Match, values: dict[Node, Any], names: dict[Node, str] | None = None, seed: int = 0
) -> MatchCheck:
    """names: labels for inputs in the report (parameter names for lifted parameters)."""
    try:
        return _check_match(gm, m, values, names or {}, seed)
    except Exception as exc:  # a broken replacement (or judge) is reported, never raised into the model
        return MatchCheck(error=f"{type(exc).__name__}: {exc}")


def _check_match(gm, m: Match, values: dict[Node, Any], names: dict[Node, str], seed: int) -> MatchCheck:
    sub, inputs = extract(gm, m)
    vals = [values[x] for x in inputs]
    grad_of = [i for i, x in enumerate(inputs) if _wants_grad(x)]

    def leaves(dtype=None, copy_activations=False):
        return [
            _leaf(v, i in grad_of, dtype, copy_activations and inputs[i].op != "placeholder")
            for i, v in enumerate(vals)
        ]

    position = {x: i for i, x in enumerate(inputs)}
    check = MatchCheck()
    # copies of activation inputs for the runs in the model's dtype: the graph's own run
    # (check_matches) reads them after this check, and a replacement may write over its
    # inputs (rope in place)
    out_eager, grad_eager, check.saved_bytes_eager = _run(sub, leaves(copy_activations=True), grad_of, seed)
    out_64, grad_64, _ = _run(to_float64(sub), leaves(torch.float64), grad_of, seed)

    ours_args = leaves(copy_activations=True)
    captures = {k: ours_args[position[v]] if isinstance(v, Node) else v for k, v in m.captures.items()}
    pattern_inputs = [ours_args[position[x]] if isinstance(x, Node) else x for x in m.inputs]

    def replacement(*_):
        return m.replace(*pattern_inputs, **captures)

    out_ours, grad_ours, check.saved_bytes_ours = _run(replacement, ours_args, grad_of, seed)
    if len(out_ours) != len(out_eager):
        check.error = f"replacement returned {len(out_ours)} outputs, the subgraph {len(out_eager)}"
        return check
    for i, (o, e, r) in enumerate(zip(out_ours, out_eager, out_64)):
        if o.shape != e.shape or o.dtype != e.dtype:
            check.error = f"output {i}: {tuple(o.shape)} {o.dtype}, expected {tuple(e.shape)} {e.dtype}"
            return check
        check.comparisons.append(Comparison(f"output {i}", relative_error(o, r), relative_error(e, r), _dt(e)))
    for k, i in enumerate(grad_of):
        name = names.get(inputs[i], inputs[i].name)
        check.comparisons.append(
            Comparison(
                f"grad {name}",
                relative_error(grad_ours[k], grad_64[k]),
                relative_error(grad_eager[k], grad_64[k]),
                _dt(vals[i]),
            )
        )
    return check


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")
