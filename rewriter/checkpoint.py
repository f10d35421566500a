"""Activation checkpointing as a graph pass, per decoder layer.

Hugging Face checkpoints a layer by calling torch.utils.checkpoint from Python, which Dynamo
cannot capture whole: the forward breaks into pieces and the layers run uncaptured, so no
pattern would apply inside them. When the model asks for checkpointing, graft captures the
layers inline (their flags are off during its calls) and puts the checkpoint back here, on the
rewritten graph: each chosen layer's nodes become one region run under non-reentrant
torch.utils.checkpoint, which keeps only the region's inputs and recomputes the rest (our fused
nodes included) in backward, with the forward's RNG state (dropout masks match). The recompute
skips work no saved tensor needs (the MLP's down GEMM: its output only feeds the residual add).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils.checkpoint
from torch.fx import Node


def run_checkpointed(region: torch.fx.GraphModule, recompute: torch.fx.GraphModule, random: bool, *args: Any) -> Any:
    """region(*args) under non-reentrant checkpoint; backward recomputes through `recompute`
    (the region without the work whose result no saved tensor needs, see _recompute_variant)."""
    calls = 0

    def run(*inputs: Any) -> Any:
        nonlocal calls  # checkpoint calls this once in forward, then once for each recompute
        calls += 1
        return (region if calls == 1 else recompute)(*inputs)

    # The RNG state is saved and restored only for a region that draws random numbers: it costs
    # host time, and reading the CUDA generator's state is not allowed inside a CUDA graph capture.
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=random)


# Ops whose backward keeps no tensor: a value flowing only through them into the region's
# outputs is never needed by a recompute, which keeps the saved tensors and drops the outputs.
_SAVES_NOTHING = {operator.add, torch.add, "add"}


def _recompute_variant(region: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The region as its recompute runs it: a node whose replacement offers
    `recompute_without_output` (the LoRA MLP: down's GEMM, a third of the MLP's FLOPs) calls that
    instead when its output reaches the region's outputs only through ops that save nothing
    (the residual add). Non-reentrant checkpoint discards the recomputed outputs and keeps only
    the saved tensors, which the variant computes exactly as the forward did."""
    graph = torch.fx.Graph()
    copied: dict[Node, Node] = {}
    graph.output(graph.graph_copy(region.graph, copied))
    changed = False
    for n in graph.nodes:
        cheaper = getattr(n.target, "recompute_without_output", None) if n.op == "call_function" else None
        if cheaper is not None and _reaches_only_outputs(n):
            n.target, changed = cheaper, True
    return torch.fx.GraphModule(region, graph) if changed else region


def _reaches_only_outputs(node: Node) -> bool:
    pending, seen = list(node.users), set()
    while pending:
        user = pending.pop()
        if user in seen or user.op == "output":
            continue
        seen.add(user)
        if user.op not in ("call_function", "call_method") or user.target not in _SAVES_NOTHING:
            return False
        pending.extend(user.users)
    return True


_SAMPLERS = {"bernoulli", "normal", "uniform", "multinomial", "poisson", "exponential", "geometric", "cauchy"}


def draws_random_numbers(nodes: Sequence[Node]) -> bool:
    """Might these nodes draw random numbers? Conservative: a dropout-like call counts unless its
    rate is a literal 0, SDPA counts when its dropout_p is not a literal 0, and so does a call
    given (or closing over) an object that declares a positive dropout (our LoRA nodes'
    projections)."""
    for n in nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        name = getattr(n.target, "__name__", str(n.target)).lower()
        values = [*n.args, *n.kwargs.values()]
        if "scaled_dot_product_attention" in name:
            p = n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0)
            if p != 0.0:
                return True
        elif "dropout" in name or name.startswith("rand") or name.rstrip("_") in _SAMPLERS:
            p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else None)
            if not (isinstance(p, float) and p == 0.0):
                return True
        cells = [_contents(c) for c in getattr(n.target, "__closure__", None) or ()]
        leaves = torch.utils._pytree.tree_leaves([values, cells])
        if any(isinstance(getattr(v, "dropout", None), float) and v.dropout > 0 for v in leaves):
            return True
    return False


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def checkpoint_regions(
    gm: torch.fx.GraphModule, region_of: Callable[[Node], str | None], regions: Sequence[str]
) -> tuple[torch.fx.GraphModule, list[str]]:
    """A copy of gm with each region (a contiguous run of nodes that region_of assigns to it)
    run under checkpoint. Returns the graph and the regions that could not be checkpointed."""
    graph = torch.fx.Graph()
    copied: dict[Node, Node] = {}
    graph.output(graph.graph_copy(gm.graph, copied))
    owner = {n: region_of(n) for n in graph.nodes if n.op not in ("placeholder", "output")}
    skipped = []
    modules: dict[str, torch.fx.GraphModule] = {}
    for name in regions:
        nodes = [n for n in graph.nodes if owner.get(n) == name]
        if not nodes:
            continue
        if not _contiguous(graph, nodes):
            skipped.append(f"{name}: its nodes are interleaved with others")
            continue
        modules[name] = _collapse(gm, graph, nodes, name, len(modules))
    graph.lint()
    attributes = {}
    for name, module in modules.items():
        attributes[_attr(name)] = module
        attributes[_attr(name) + "_recompute"] = _recompute_variant(module)
    for n in graph.nodes:
        if n.op == "get_attr" and n.target not in attributes:
            attributes[n.target] = getattr(gm, n.target)
    return torch.fx.GraphModule(attributes, graph), skipped


def _attr(region: str) -> str:
    return "checkpointed_" + region.replace(".", "_")


def _contiguous(graph: torch.fx.Graph, nodes: list[Node]) -> bool:
    order = {n: i for i, n in enumerate(graph.nodes)}
    positions = sorted(order[n] for n in nodes)
    return positions[-1] - positions[0] + 1 == len(positions)


def _collapse(gm, graph: torch.fx.Graph, nodes: list[Node], name: str, index: int) -> torch.fx.GraphModule:
    inside = set(nodes)
    inputs: dict[Node, None] = {}
    for n in nodes:
        for x in n.all_input_nodes:
            if x not in inside:
                inputs.setdefault(x)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub = torch.fx.Graph()
    env: dict[Node, Node] = {}
    for x in inputs:
        env[x] = sub.placeholder(x.name)
    for n in nodes:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(tuple(env[o] for o in outputs))
    region = torch.fx.GraphModule(gm, sub)
    with graph.inserting_before(nodes[0]):
        module, recompute = graph.get_attr(_attr(name)), graph.get_attr(_attr(name) + "_recompute")
        call = graph.call_function(run_checkpointed, (module, recompute, draws_random_numbers(nodes), *inputs))
        items = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for out, item in zip(outputs, items):
        item.meta = dict(out.meta)
        out.replace_all_uses_with(item)
    for n in reversed(nodes):
        graph.erase_node(n)
    return region
