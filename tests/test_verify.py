"""The per-match checks' run of the sample: each match is checked as soon as its inputs
exist, values are dropped once no waiting match needs them, and no autograd graph is built."""

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from patterns.norms import RMSNORM
from rewriter.capture import trace
from rewriter.match import external_inputs, find_matches
from rewriter.verify import MatchCheck, _CheckingInterpreter, check_matches


def no_module(node):
    return "", ""


class ThreeNorms(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norms = torch.nn.ModuleList(LlamaRMSNorm(width) for _ in range(3))
        self.scale = torch.nn.Parameter(torch.ones(width))

    def forward(self, x):
        with torch.no_grad():  # a grad-mode switch in the graph, as HF's rotary embedding makes
            offset = x.mean()
        for norm in self.norms:
            x = norm(x) * self.scale + offset
        return x


def test_each_match_is_checked_once_its_inputs_exist_and_its_values_are_then_dropped():
    model = ThreeNorms(24)
    x = torch.randn(5, 24)
    gm, inputs = trace(model, (x,))
    matches, _ = find_matches(gm.graph, [RMSNORM], no_module)
    assert len(matches) == 3
    held_at_check = []

    def check(m, values):
        held_at_check.append(set(values))
        return MatchCheck()

    interpreter = _CheckingInterpreter(gm, matches, check)
    with torch.no_grad():
        interpreter.run(*inputs)
    assert [set(external_inputs(m)) <= held for m, held in zip(matches, held_at_check)] == [True] * 3
    # the first norm's input (the graph input x) is gone by the time the third is checked
    first_activation = next(n for n in external_inputs(matches[0]) if n not in external_inputs(matches[2]))
    assert first_activation not in held_at_check[2]
    assert interpreter.values == {} and len(interpreter.results) == 3


def test_the_run_builds_no_autograd_graph_through_the_captures_grad_mode_switches():
    model = ThreeNorms(24)
    gm, inputs = trace(model, (torch.randn(5, 24),))
    assert any(n.target is torch._C._set_grad_enabled for n in gm.graph.nodes)
    with torch.no_grad():
        ours = _CheckingInterpreter(gm, [], lambda m, values: MatchCheck()).run(*inputs)
    with torch.no_grad():  # a plain run leaves grad on at the end: a block of its own
        plain = torch.fx.Interpreter(gm).run(*inputs)
    plain, ours = (t[0] if isinstance(t, (tuple, list)) else t for t in (plain, ours))
    assert plain.requires_grad  # the graph turned grad back on: autograd kept every activation
    assert not ours.requires_grad
    torch.testing.assert_close(ours, plain.detach(), rtol=0, atol=0)


def test_every_match_gets_a_verdict_and_the_checks_differentiate():
    model = ThreeNorms(24)
    gm, inputs = trace(model, (torch.randn(5, 24, requires_grad=True),))
    matches, _ = find_matches(gm.graph, [RMSNORM], no_module)
    checks = check_matches(gm, inputs, matches)
    assert len(checks) == 3
    for check in checks:
        assert check.error is None and check.passed
        assert any(c.what.startswith("grad") for c in check.comparisons)  # gradients were compared
