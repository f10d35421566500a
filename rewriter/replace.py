"""Replace: a copy of the captured graph with each accepted match collapsed into one call.

The original graph is never edited, so reverting a replacement is rebuilding without it."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx
from torch.fx import Node

from rewriter.match import Match, external_inputs


def rewrite(gm: torch.fx.GraphModule, matches: Iterable[Match]) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    copied: dict[Node, Node] = {}
    graph.output(graph.graph_copy(gm.graph, copied))
    for m in matches:
        _collapse(graph, m, copied)
    graph.lint()
    new = torch.fx.GraphModule(gm, graph)
    new.meta.update(gm.meta)
    return new


def _mapped(value, copied: dict[Node, Node]):
    return torch.fx.node.map_arg(value, lambda n: copied[n])


def _collapse(graph: torch.fx.Graph, m: Match, copied: dict[Node, Node]) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    interior = [copied[n] for n in m.nodes]
    # Right before the first replaced node, or after the last input if one comes later
    # (the matcher checked that this precedes every outside use of an output).
    first = interior[0]
    anchor = max([first.prev] + [copied[x] for x in external_inputs(m)], key=order.__getitem__)
    with graph.inserting_after(anchor):
        call = graph.call_function(m.replace, tuple(_mapped(m.inputs, copied)), _mapped(m.captures, copied))
    call.meta["graft_pattern"] = m.pattern.name
    call.meta["graft_module"] = m.module
    outputs = [copied[o] for o in m.outputs]
    if len(outputs) == 1:
        call.meta["example_value"] = outputs[0].meta.get("example_value")
        outputs[0].replace_all_uses_with(call)
        copied[m.outputs[0]] = call
    else:
        previous = call
        for i, out in enumerate(outputs):
            with graph.inserting_after(previous):
                item = graph.call_function(operator.getitem, (call, i))
            item.meta["example_value"] = out.meta.get("example_value")
            item.meta["graft_module"] = m.module
            out.replace_all_uses_with(item)
            copied[m.outputs[i]] = item
            previous = item
    for n in (copied[d] for d in m.dropped):
        for user in list(n.users):  # only the graph's output node (checked by the matcher)
            user.args = torch.fx.node.map_arg(user.args, lambda a, n=n: None if a is n else a)
    for n in reversed(interior):
        graph.erase_node(n)
