"""Module patterns: match the subgraph a group of modules computes, whatever ops it was captured as.

Some layers reach the graph in forms that vary with library versions and with the input: PEFT's
LoRA over a bitsandbytes 4-bit Linear is captured as `torch.ops.bitsandbytes.gemm_4bit`, as
`gemv_4bit`, or as bnb's MatMul4Bit traced into an `autograd_function_apply` higher-order op,
depending on whether the input requires grad, its size and the torch version. Rather than one
traced pattern per form, a module pattern takes every node Dynamo attributes to the modules
(`nn_module_stack`) as the subgraph, and its `bind` reads the module objects themselves (rank,
scaling, dropout, quantization state) to build the replacement. The module boundary is trusted
only for *where* the subgraph is; *what* it computes is proven by the float64 verification of
the replacement against exactly those nodes, on real data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from rewriter.match import Candidate, GraphContext, Match, external_inputs


@dataclass
class ModuleGroup:
    """The nodes of a group of modules, what they read and what leaves them."""

    paths: list[str]
    modules: list[torch.nn.Module]
    nodes: list[Node]
    inputs: list[Node]  # outside nodes the group reads, in first-use order
    outputs: list[Node]  # group nodes used outside it, in graph order
    values: Mapping[Node, Any]  # placeholder -> real value
    module_of: Callable[[Node], tuple[str, str]]

    def node_for(self, tensor: torch.Tensor | None) -> Node | None:
        """The input node that carries this tensor (a parameter lifted by Dynamo)."""
        if tensor is None:
            return None
        return next((n for n in self.inputs if self.values.get(n) is tensor), None)

    def activations(self) -> list[Node]:
        """Inputs computed by the graph, or handed to it as a local of the captured frame (after a
        graph break, e.g. at FSDP's per-layer hooks, a layer's input arrives so); not lifted
        parameters, buffers or sizes."""
        return [
            n
            for n in self.inputs
            if isinstance(n.meta.get("example_value"), torch.Tensor) and (n.op != "placeholder" or _frame_local(n))
        ]

    def outputs_of(self, path: str) -> list[Node]:
        return [o for o in self.outputs if _within(self.module_of(o)[0], [path])]


def _frame_local(node: Node) -> bool:
    """A placeholder Dynamo made from the frame's arguments or locals (`L['hidden_states']`,
    `L['args'][0]`), not from a module's state (`L['self']._modules[...]._parameters[...]`,
    globals)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = str(getattr(source, "name", ""))
    while getattr(source, "base", None) is not None:
        source = source.base
    return (
        type(source).__name__ == "LocalSource"
        and getattr(source, "local_name", None) != "self"
        and not any(part in name for part in ("_parameters[", "_buffers[", "_modules["))
    )


@dataclass(frozen=True)
class ModuleBinding:
    """How a group is replaced: replace(*inputs) returns one value per output."""

    inputs: list[Node]
    outputs: list[Node]
    replace: Callable[..., Any]


@dataclass(frozen=True, eq=False)
class ModulePattern:
    """select(path, module, modules) -> the module paths one match covers (rooted at `path`),
    or None; bind(group) -> a ModuleBinding, or the reason the group cannot be replaced."""

    name: str
    select: Callable[[str, torch.nn.Module, Mapping[str, torch.nn.Module]], list[str] | None]
    bind: Callable[[ModuleGroup], ModuleBinding | str]
    expect: tuple[str, ...] = ()
    guard = None
    drops_graph_outputs = False

    @property
    def source(self) -> str:
        code = self.bind.__code__
        return f"{code.co_filename}:{code.co_firstlineno}"

    def __repr__(self) -> str:
        return f"ModulePattern({self.name!r} at {self.source})"

    def candidates(self, ctx: GraphContext, claimed: set[Node]) -> Iterator[Candidate]:
        by_module = _nodes_by_module(ctx)
        for path, module in ctx.modules.items():
            paths = self.select(path, module, ctx.modules)
            if not paths:
                continue
            nodes = sorted({n for p in paths for n in by_module.get(p, [])}, key=ctx.order.__getitem__)
            if not nodes or claimed.intersection(nodes):
                continue  # not in this graph (a graph break), or taken by a larger pattern
            inside = set(nodes)
            probe = Match(pattern=self, inputs=[], outputs=[], nodes=nodes, captures={}, replace=_unbound)
            group = ModuleGroup(
                paths=paths,
                modules=[ctx.modules[p] for p in paths],
                nodes=nodes,
                inputs=external_inputs(probe),
                outputs=[n for n in nodes if any(u not in inside for u in n.users)],
                values=ctx.values,
                module_of=ctx.module_of,
            )
            bound = self.bind(group)
            cls = type(module).__name__
            if isinstance(bound, str):
                yield Candidate(path, cls, reason=bound)
                continue
            match = Match(
                pattern=self,
                inputs=bound.inputs,
                outputs=bound.outputs,
                nodes=nodes,
                captures={},
                module=path,
                replace=bound.replace,
            )
            yield Candidate(path, cls, match=match)


def _unbound(*args: Any) -> Any:
    raise AssertionError("a module group was used before it was bound")


def _within(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _nodes_by_module(ctx: GraphContext) -> dict[str, list[Node]]:
    """Each computing node under every module path that encloses it (computed once per graph)."""
    cached = getattr(ctx, "_by_module", None)
    if cached is not None:
        return cached
    index: dict[str, list[Node]] = {}
    for n in ctx.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        path = ctx.module_of(n)[0]
        parts = path.split(".") if path else []
        for i in range(1, len(parts) + 1):
            index.setdefault(".".join(parts[:i]), []).append(n)
    ctx._by_module = index
    return index
