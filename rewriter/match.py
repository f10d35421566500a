"""Patterns and the matcher.

A pattern is ordinary PyTorch code (the `search` function, usually a copy of the library's
own code) traced with the same capture as the model, so its IR is the model's IR. It is traced
twice, with different example shapes, scalar values and floating dtype; constants that differ
between the two traces are wildcards (a scalar argument such as `eps`, the floating dtype, a
size derived from a shape) and bind to whatever the model has there, consistently across the
pattern. Constants equal in both traces (a fixed `torch.float32` upcast, `dim=-1`) must match.

Why our own matcher rather than networkx's subgraph isomorphism: FX graphs are DAGs whose
edges are ordered operands (`a - b` is not `b - a`) and carry constants and kwargs. Matching
backwards from an anchor node, operand by operand, is linear in the pattern's size for each
candidate anchor and states exactly why a candidate failed; VF2 would need the operand order
and constants encoded as attributes and searches far more than it must.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.fx
from torch.fx import Node
from torch.multiprocessing.reductions import StorageWeakRef

from rewriter.capture import trace

_FLOAT_VARIANTS = (torch.float64, torch.float32)


@dataclass(frozen=True)
class Wildcard:
    """A constant of the pattern that binds to the model's value (`eps`, `dtype`, a size)."""

    name: str


@dataclass(frozen=True, eq=False)
class Pattern:
    """A rewrite rule: `search` as PyTorch code, a `guard`, and the `replace` op.

    inputs: the tensor parameters of `search`, each a tuple of dimension names (or fixed
        sizes), optionally ending in a dtype; without one the tensor is floating and its dtype
        a wildcard. Parameters of `search` not listed are scalars and become wildcards.
    replace: called at run time as replace(*inputs, **captures) with the matched tensors in
        the order of `inputs` and every wildcard's value by name; returns the output tensor
        (or a tuple, one per output of `search`).
    guard: given the Match, returns None to accept or a reason (shapes, dtypes, captured
        constants) to refuse; the reason goes into the report.
    expect: class-name suffixes of modules this pattern should cover; such a module left
        uncovered is reported with the reason the match failed there.
    drops_graph_outputs: an interior value whose only outside use is the graph's output
        (the logits a loss pattern consumes) is returned as None instead of blocking the match.
    choose: given an accepted Match, returns the replacement for it (default `replace`):
        another flavour of the op where the graph proves it safe (rope in place where q and
        k die in the match, `only_reader`).
    """

    name: str
    search: Callable[..., Any]
    inputs: Mapping[str, tuple[Any, ...]]
    replace: Callable[..., Any]
    guard: Callable[[Match], str | None] | None = None
    expect: tuple[str, ...] = ()
    drops_graph_outputs: bool = False
    choose: Callable[[Match], Callable[..., Any]] | None = None

    @property
    def source(self) -> str:
        code = self.search.__code__
        return f"{code.co_filename}:{code.co_firstlineno}"

    @cached_property
    def graph(self) -> PatternGraph:
        return PatternGraph.build(self)

    def candidates(self, ctx: GraphContext, claimed: set[Node]):
        return _traced_candidates(self, ctx, claimed)

    def __repr__(self) -> str:
        return f"Pattern({self.name!r} at {self.source})"


@dataclass
class PatternGraph:
    graph: torch.fx.Graph
    inputs: list[Node]  # placeholders, in the order of Pattern.inputs
    outputs: list[Node]

    @staticmethod
    def build(pattern: Pattern) -> PatternGraph:
        traces = [_trace_variant(pattern, v) for v in (0, 1)]
        (graph, inputs, outputs), (graph1, _, _) = traces
        nodes0 = [n for n in graph.nodes if n.op != "output"]
        nodes1 = [n for n in graph1.nodes if n.op != "output"]
        if len(nodes0) != len(nodes1):
            raise ValueError(f"{pattern!r}: the two example traces differ in structure")
        scalars = _scalar_sentinels(pattern)
        # a constant that is a named dimension's size in both traces binds by that name
        names: dict[tuple[Any, Any], str] = {
            (s0, s1): d for (d, s0), s1 in zip(_dim_sizes(pattern, 0).items(), _dim_sizes(pattern, 1).values())
        }
        index = {b: a for a, b in zip(nodes0, nodes1)}
        for a, b in zip(nodes0, nodes1):
            if a.op != b.op or a.target != b.target:
                raise ValueError(f"{pattern!r}: traces differ at {a.name} vs {b.name}")
            a.args = _generalise(a.args, b.args, index, scalars, names, pattern)
            a.kwargs = _generalise(a.kwargs, b.kwargs, index, scalars, names, pattern)
        return PatternGraph(graph, inputs, outputs)


def _scalar_names(pattern: Pattern) -> list[str]:
    params = inspect.signature(pattern.search).parameters
    missing = set(pattern.inputs) - set(params)
    if missing:
        raise ValueError(f"{pattern!r}: inputs {sorted(missing)} are not parameters of search")
    return [p for p in params if p not in pattern.inputs]


def _scalar_sentinels(pattern: Pattern) -> dict[str, tuple[Any, Any]]:
    """Two values per scalar parameter, one for each trace: unlikely numbers, or the first two
    choices of a `Literal[...]` annotation (a string option such as a loss's reduction)."""
    params = inspect.signature(pattern.search).parameters
    hints = typing.get_type_hints(pattern.search)
    sentinels = {}
    for i, name in enumerate(_scalar_names(pattern)):
        choices = typing.get_args(hints.get(name)) if typing.get_origin(hints.get(name)) is typing.Literal else ()
        if len(choices) >= 2:
            sentinels[name] = (choices[0], choices[1])
        elif isinstance(params[name].default, int) and not isinstance(params[name].default, bool):
            sentinels[name] = (1009 + 2 * i, 2003 + 2 * i)
        else:
            sentinels[name] = (1.2345679e-3 * (i + 1), 2.3456791e-3 * (i + 1))
    return sentinels


def _dim_sizes(pattern: Pattern, variant: int) -> dict[str, int]:
    """The size each named dimension takes in one trace (different in the two traces)."""
    dims: dict[str, int] = {}
    for spec in pattern.inputs.values():
        for d in spec:
            if isinstance(d, str):
                dims.setdefault(d, 6 + 4 * len(dims) + 2 * variant)
    return dims


def _trace_variant(pattern: Pattern, variant: int) -> tuple[torch.fx.Graph, list[Node], list[Node]]:
    dims = _dim_sizes(pattern, variant)
    tensors = []
    for spec in pattern.inputs.values():
        dtype = spec[-1] if spec and isinstance(spec[-1], torch.dtype) else _FLOAT_VARIANTS[variant]
        shape = []
        for d in spec:
            if isinstance(d, torch.dtype):
                continue
            shape.append(dims[d] if isinstance(d, str) else d)
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, dtype=dtype))
        else:
            tensors.append(torch.randint(0, 4, shape, dtype=dtype))
    scalars = {k: v[variant] for k, v in _scalar_sentinels(pattern).items()}
    names = list(pattern.inputs)

    def bound(*ts):
        return pattern.search(**dict(zip(names, ts)), **scalars)

    gm, example_inputs = trace(bound, tuple(tensors))
    graph = gm.graph
    graph.eliminate_dead_code()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    by_input = {}
    for ph, value in zip(placeholders, example_inputs):
        for name, t in zip(names, tensors):
            if value is t:
                by_input[name] = ph
    if set(by_input) != set(names) or len(placeholders) != len(names):
        raise ValueError(f"{pattern!r}: every input must be used, and only tensors may be inputs")
    (output,) = [n for n in graph.nodes if n.op == "output"]
    outs = output.args[0]
    outputs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    return graph, [by_input[n] for n in names], outputs


def _generalise(a, b, index, scalars, names, pattern):
    """Replace the constants of trace 0 that differ in trace 1 by wildcards."""
    if isinstance(a, Node):
        if index.get(b) is not a:
            raise ValueError(f"{pattern!r}: traces differ in operands at {a.name}")
        return a
    if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
        return type(a)(_generalise(x, y, index, scalars, names, pattern) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _generalise(a[k], b[k], index, scalars, names, pattern) for k in a}
    if isinstance(a, slice) and isinstance(b, slice):
        parts = [_generalise(x, y, index, scalars, names, pattern) for x, y in _slice_parts(a, b)]
        return slice(*parts)
    if isinstance(a, torch.device):
        return Wildcard("device")  # patterns are traced on CPU; the model may be anywhere
    if type(a) is type(b) and a == b:
        return a
    for name, (s0, s1) in scalars.items():
        if a == s0 and b == s1:
            return Wildcard(name)
    if (a, b) == _FLOAT_VARIANTS:
        return Wildcard("dtype")
    key = (a, b)
    if key not in names:
        names[key] = f"c{len(names)}"
    return Wildcard(names[key])


def _slice_parts(a: slice, b: slice):
    return zip((a.start, a.stop, a.step), (b.start, b.stop, b.step))


@dataclass
class Match:
    """One occurrence of a pattern in a model graph."""

    pattern: Pattern
    inputs: list[Any]  # model nodes bound to the pattern's inputs, in Pattern.inputs order
    outputs: list[Node]
    nodes: list[Node]  # every replaced node, in graph order
    captures: dict[str, Any]
    module: str = ""
    index: int = 0  # occurrence of this pattern within `module`
    dropped: list[Node] = field(default_factory=list)  # interior values dropped from the graph output
    replace: Callable[..., Any] | None = None  # what runs instead; pattern.replace unless bound per match

    def __post_init__(self):
        if self.replace is None:
            self.replace = self.pattern.replace

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.pattern.name, self.module, self.index)

    def input(self, name: str) -> Any:
        """The example value (a FakeTensor with shape and dtype) of a named input."""
        node = self.inputs[list(self.pattern.inputs).index(name)]
        return node.meta.get("example_value") if isinstance(node, Node) else node

    def output(self, i: int = 0) -> Any:
        return self.outputs[i].meta.get("example_value")


@dataclass
class _Binding:
    nodes: dict[Node, Any] = field(default_factory=dict)  # pattern node -> model node
    used: set[Node] = field(default_factory=set)  # model nodes bound to interior pattern nodes
    wild: dict[str, Any] = field(default_factory=dict)
    failure: str = ""

    def copy(self) -> _Binding:
        return _Binding(dict(self.nodes), set(self.used), dict(self.wild), self.failure)

    def fail(self, why: str) -> bool:
        self.failure = self.failure or why
        return False


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Node) or isinstance(b, Node):
        return a is b
    return type(a) is type(b) and a == b


def _match_node(p: Node, n: Any, b: _Binding) -> bool:
    if p in b.nodes:
        return b.nodes[p] is n or b.fail(f"{_name(n)} is not the value bound earlier")
    if p.op == "placeholder":
        if not isinstance(n, Node):
            return b.fail(f"constant {n!r} where the pattern has tensor {p.name}")
        b.nodes[p] = n
        return True
    if not isinstance(n, Node):
        return b.fail(f"constant {n!r} where the pattern computes {_describe(p)}")
    if n.op != p.op or n.target != p.target:
        return b.fail(f"{n.name} is {_describe(n)}, the pattern has {_describe(p)}")
    if n in b.used:
        return b.fail(f"{n.name} would be matched twice")
    if len(n.args) != len(p.args) or n.kwargs.keys() != p.kwargs.keys():
        return b.fail(f"{n.name}: operands differ from the pattern's {_describe(p)}")
    b.nodes[p] = n
    b.used.add(n)
    return all(_match_arg(pa, na, b) for pa, na in zip(p.args, n.args)) and all(
        _match_arg(p.kwargs[k], n.kwargs[k], b) for k in p.kwargs
    )


def _match_arg(pa: Any, na: Any, b: _Binding) -> bool:
    if isinstance(pa, Node):
        return _match_node(pa, na, b)
    if isinstance(pa, Wildcard):
        if pa.name in b.wild:
            return _same_value(b.wild[pa.name], na) or b.fail(f"{pa.name} binds {b.wild[pa.name]!r} and {na!r}")
        b.wild[pa.name] = na
        return True
    if isinstance(pa, (tuple, list)):
        if not isinstance(na, (tuple, list)) or len(pa) != len(na):
            return b.fail(f"{na!r} is not a sequence like {pa!r}")
        return all(_match_arg(x, y, b) for x, y in zip(pa, na))
    if isinstance(pa, dict):
        if not isinstance(na, dict) or pa.keys() != na.keys():
            return b.fail(f"{na!r} differs from {pa!r}")
        return all(_match_arg(pa[k], na[k], b) for k in pa)
    if isinstance(pa, slice):
        if not isinstance(na, slice):
            return b.fail(f"{na!r} is not a slice")
        return all(_match_arg(x, y, b) for x, y in _slice_parts(pa, na))
    return _same_value(pa, na) or b.fail(f"constant {na!r} where the pattern has {pa!r}")


def _name(n: Any) -> str:
    return n.name if isinstance(n, Node) else repr(n)


def _describe(n: Node) -> str:
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"{n.op} {target}"


def _same_kind(p: Node, n: Node) -> bool:
    return n.op == p.op and n.target == p.target


def match_at(pg: PatternGraph, anchor: Node, order: Mapping[Node, int]) -> _Binding:
    """Bind the pattern's first output to `anchor`, then find its other outputs nearby."""
    b = _Binding()
    if not _match_node(pg.outputs[0], anchor, b):
        return b
    for p_out in pg.outputs[1:]:
        if p_out in b.nodes:
            continue
        candidates = [n for n in order if _same_kind(p_out, n) and n not in b.used]
        candidates.sort(key=lambda n: abs(order[n] - order[anchor]))
        for n in candidates:
            trial = b.copy()
            if _match_node(p_out, n, trial):
                b = trial
                break
        else:
            b.fail(f"no {_describe(p_out)} near {anchor.name} completes the pattern's second output")
            return b
    return b


@dataclass
class Rejection:
    """A structural match that was not applied, or a module a pattern expected to cover."""

    pattern: str
    module: str
    reason: str


@dataclass
class GraphContext:
    """What a matcher may consult besides the graph."""

    graph: torch.fx.Graph
    module_of: Callable[[Node], tuple[str, str]]  # node -> (module path, class name) it came from
    modules: Mapping[str, torch.nn.Module] = field(default_factory=dict)  # path -> module
    values: Mapping[Node, Any] = field(default_factory=dict)  # placeholder -> its real value

    @cached_property
    def order(self) -> dict[Node, int]:
        return {n: i for i, n in enumerate(self.graph.nodes)}


@dataclass
class Candidate:
    """A place a pattern was tried: a Match, or why it failed and how far it got."""

    module: str
    cls: str
    match: Match | None = None
    failure: str = ""
    depth: int = 0
    reason: str | None = None  # a structural match refused (guard, binding)


def find_matches(
    graph: torch.fx.Graph,
    patterns: Sequence[Any],
    module_of: Callable[[Node], tuple[str, str]],
    modules: Mapping[str, torch.nn.Module] | None = None,
    values: Mapping[Node, Any] | None = None,
) -> tuple[list[Match], list[Rejection]]:
    """All non-overlapping matches, patterns taken in order (larger ones first).

    A pattern is a traced `Pattern` or a `ModulePattern` (rewriter/module_match.py); each
    offers candidates, and this loop applies the rules common to both: no overlap, no escaping
    value, a convex subgraph, and a guard."""
    ctx = GraphContext(graph, module_of, modules or {}, values or {})
    claimed: set[Node] = set()
    matches: list[Match] = []
    rejections: list[Rejection] = []
    for pattern in patterns:
        near_misses: dict[str, tuple[int, str]] = {}  # module -> the failure that got furthest
        for c in pattern.candidates(ctx, claimed):
            if c.match is None and c.reason is None:
                if pattern.expect and c.cls.endswith(pattern.expect):
                    near_misses[c.module] = max(near_misses.get(c.module, (-1, "")), (c.depth, c.failure))
                continue
            m = c.match
            if m is not None and claimed.intersection(m.nodes):
                continue
            reason = c.reason or _blocked(m, ctx.order) or (pattern.guard(m) if pattern.guard else None)
            if reason:
                rejections.append(Rejection(pattern.name, m.module if m else c.module, reason))
                continue
            if getattr(pattern, "choose", None) is not None:
                m.replace = pattern.choose(m)
            m.index = sum(1 for x in matches if x.pattern is pattern and x.module == m.module)
            claimed.update(m.nodes)
            matches.append(m)
        covered = {m.module for m in matches if m.pattern is pattern} | {r.module for r in rejections}
        for module, (_, why) in near_misses.items():
            if not any(c == module or c.startswith(module + ".") for c in covered):
                rejections.append(Rejection(pattern.name, module, f"no structural match: {why}"))
    return matches, rejections


def _traced_candidates(pattern: Pattern, ctx: GraphContext, claimed: set[Node]):
    pg = pattern.graph
    anchor_p = pg.outputs[0]
    for node in ctx.graph.nodes:
        if not _same_kind(anchor_p, node) or node in claimed:
            continue
        b = match_at(pg, node, ctx.order)
        module, cls = ctx.module_of(node)
        if b.failure:
            yield Candidate(module, cls, failure=b.failure, depth=len(b.nodes))
        else:
            yield Candidate(module, cls, match=_make_match(pattern, pg, b, ctx.order, ctx.module_of))


def _make_match(pattern, pg, b, order, module_of) -> Match:
    interior = sorted((n for p, n in b.nodes.items() if p.op != "placeholder"), key=order.__getitem__)
    modules = [module_of(n)[0] for n in interior]
    return Match(
        pattern=pattern,
        inputs=[b.nodes[p] for p in pg.inputs],
        outputs=[b.nodes[p] for p in pg.outputs],
        nodes=interior,
        captures=dict(b.wild),
        module=_common_module(modules),
    )


def _common_module(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for level in zip(*parts):
        if any(x != level[0] for x in level):
            break
        common.append(level[0])
    return ".".join(common)


def _blocked(m: Match, order: Mapping[Node, int]) -> str | None:
    """Why the match cannot be replaced by one node: an interior value escapes, or the
    replacement would have to run both before and after some outside node."""
    inside = set(m.nodes)
    outputs = set(m.outputs)
    for n in m.nodes:
        if n in outputs:
            continue
        outside = [u for u in n.users if u not in inside]
        if m.pattern.drops_graph_outputs and outside and all(u.op == "output" for u in outside):
            m.dropped.append(n)
        elif outside:
            return f"value of {n.name} escapes the pattern (used by {outside[0].name})"
    external_users = [u for o in m.outputs for u in o.users if u not in inside]
    inputs = [x for x in external_inputs(m) if x in order]
    if external_users and inputs:
        if max(order[x] for x in inputs) > min(order[u] for u in external_users):
            return "an input is computed after a use of an output (not convex)"
    return None


def external_inputs(m: Match) -> list[Node]:
    """Every node outside the match that a replaced node reads, in first-use order."""
    inside = set(m.nodes)
    seen: dict[Node, None] = {}
    for n in m.nodes:
        for x in n.all_input_nodes:
            if x not in inside:
                seen.setdefault(x)
    return list(seen)


def _storages(node: Node) -> set[StorageWeakRef]:
    """The storages of the tensors a node's example value holds (a tensor, or a tuple of them
    from a split): the capture's fake tensors share a storage where the real ones would."""
    value = node.meta.get("example_value")
    values = value if isinstance(value, (tuple, list)) else (value,)
    return {StorageWeakRef(t.untyped_storage()) for t in values if isinstance(t, torch.Tensor)}


def only_reader(m: Match, name: str) -> set[Node] | None:
    """The nodes whose values share input `name`'s memory (views of it, what it is a view of,
    in-place results on it, other parts of a split), if none is a graph input, those outside
    the match all come before it, and nothing but the match and they read them: the match may
    then write over that input in place without changing what another node reads. None where
    that is not proven. What autograd saved is not in the graph: an op that writes in place
    bumps the version counter, so that autograd raises rather than read changed values."""
    node = m.inputs[list(m.pattern.inputs).index(name)]
    if not isinstance(node, Node) or len(_storages(node)) != 1:
        return None
    (storage,) = _storages(node)
    inside = set(m.nodes)
    aliases, frontier = {node}, [node]
    while frontier:  # a storage's tensors are connected: each view is made from another one
        n = frontier.pop()
        for x in [*n.all_input_nodes, *n.users]:
            if x not in aliases and storage in _storages(x):
                aliases.add(x)
                frontier.append(x)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    first = min(order[n] for n in m.nodes)
    readers = inside | aliases
    for a in aliases - inside:
        if a.op in ("placeholder", "get_attr") or order[a] > first:
            return None  # the caller's tensor (or a parameter), or a view made after the match
        if any(u not in readers for u in a.users):
            return None
    return aliases
