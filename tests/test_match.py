"""The matcher on real captured graphs: wildcards, escapes, multi-output patterns, guards."""

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from patterns.norms import RMSNORM
from rewriter.capture import trace
from rewriter.match import Pattern, Wildcard, find_matches
from rewriter.replace import rewrite


def no_module(node):
    return "", ""


def capture(fn, *args):
    gm, _ = trace(fn, args)
    return gm


def run(gm, fn, *args):
    """Call a captured graph: its placeholders come in Dynamo's order, not fn's."""
    _, inputs = trace(fn, args)
    return gm(*inputs)[0]


def test_pattern_wildcards_are_the_constants_that_vary():
    nodes = list(RMSNORM.graph.graph.nodes)
    consts = [a for n in nodes for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, Wildcard)]
    assert {w.name for w in consts} == {"variance_epsilon", "dtype"}
    fixed = [a for n in nodes for a in n.args if isinstance(a, torch.dtype)]
    assert fixed == [torch.float32]  # the upcast is part of the pattern, not a wildcard


def test_hf_rmsnorm_matches_and_captures_eps_and_dtype():
    norm = LlamaRMSNorm(48, eps=3e-5).to(torch.bfloat16)
    x = torch.randn(5, 48, dtype=torch.bfloat16)
    gm = capture(norm, x)
    matches, rejections = find_matches(gm.graph, [RMSNORM], no_module)
    assert len(matches) == 1 and not rejections
    assert matches[0].captures["variance_epsilon"] == 3e-5
    assert matches[0].captures["dtype"] == torch.bfloat16
    assert len(matches[0].nodes) == 8
    rewritten = rewrite(gm, matches)
    targets = [n.target for n in rewritten.graph.nodes if n.op == "call_function"]
    assert targets == [RMSNORM.replace]
    torch.testing.assert_close(run(rewritten, norm, x), norm(x))


def test_a_different_constant_does_not_match_and_the_reason_is_given():
    def mean_over_rows(x, w):  # normalises over dim 0: same ops, another constant
        h = x.to(torch.float32)
        v = h.pow(2).mean(0, keepdim=True)
        return w * (h * torch.rsqrt(v + 1e-6)).to(x.dtype)

    gm = capture(mean_over_rows, torch.randn(4, 6), torch.randn(6))
    matches, rejections = find_matches(gm.graph, [RMSNORM], lambda n: ("layers.0.norm", "LlamaRMSNorm"))
    assert not matches
    assert rejections and "constant 0 where the pattern has -1" in rejections[0].reason


def test_an_escaping_intermediate_blocks_the_match():
    norm = LlamaRMSNorm(16)

    def leaky(x):
        y = norm(x)
        return y, x.to(torch.float32).pow(2)  # re-uses nothing: pow here is its own node

    def leaks_variance(x):
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        y = norm.weight * (h * torch.rsqrt(variance + 1e-6)).to(x.dtype)
        return y, variance

    x = torch.randn(3, 16)
    assert len(find_matches(capture(leaky, x).graph, [RMSNORM], no_module)[0]) == 1
    matches, rejections = find_matches(capture(leaks_variance, x).graph, [RMSNORM], no_module)
    assert not matches
    assert "escapes the pattern" in rejections[0].reason


def rotate_pair(a, b, c):
    return a * c + b, a * c - b


PAIR = Pattern(
    name="pair",
    search=rotate_pair,
    inputs={"a": ("T",), "b": ("T",), "c": ("T",)},
    replace=lambda a, b, c: rotate_pair(a, b, c),
)


def test_a_pattern_with_two_outputs_is_one_match():
    def model(x, y, z):
        p, q = rotate_pair(x.sin(), y, z)
        return p.exp() + q.cos()

    args = [torch.randn(7) for _ in range(3)]
    gm = capture(model, *args)
    matches, _ = find_matches(gm.graph, [PAIR], no_module)
    assert len(matches) == 1 and len(matches[0].outputs) == 2
    rewritten = rewrite(gm, matches)
    assert sum(n.target is PAIR.replace for n in rewritten.graph.nodes) == 1
    torch.testing.assert_close(run(rewritten, model, *args), model(*args))


def test_guard_refusal_is_reported():
    refusing = Pattern(
        name="refusing",
        search=RMSNORM.search,
        inputs=RMSNORM.inputs,
        replace=RMSNORM.replace,
        guard=lambda m: f"hidden size {m.input('hidden_states').shape[-1]} is not supported",
    )
    norm = LlamaRMSNorm(24)
    gm = capture(norm, torch.randn(2, 24))
    matches, rejections = find_matches(gm.graph, [refusing], no_module)
    assert not matches and rejections[0].reason == "hidden size 24 is not supported"


def test_matches_never_overlap():
    norm = LlamaRMSNorm(8)
    gm = capture(lambda x: norm(norm(x)), torch.randn(3, 8))
    matches, _ = find_matches(gm.graph, [RMSNORM, RMSNORM], no_module)
    assert len(matches) == 2
    assert not set(matches[0].nodes) & set(matches[1].nodes)


def sum_of_exp(x):
    return x.exp().sum()


def test_an_interior_value_returned_by_the_graph_is_dropped_only_when_allowed():
    def model(x):
        e = x.exp()
        return e.sum(), e  # like a loss and the logits it was computed from

    x = torch.randn(5)
    gm = capture(model, x)
    strict = Pattern(name="strict", search=sum_of_exp, inputs={"x": ("T",)}, replace=sum_of_exp)
    matches, rejections = find_matches(gm.graph, [strict], no_module)
    assert not matches and "escapes" in rejections[0].reason

    dropping = Pattern(
        name="dropping", search=sum_of_exp, inputs={"x": ("T",)}, replace=sum_of_exp, drops_graph_outputs=True
    )
    matches, _ = find_matches(gm.graph, [dropping], no_module)
    assert len(matches) == 1 and [n.name for n in matches[0].dropped] == ["e"]
    total, dropped = rewrite(gm, matches)(x)
    assert dropped is None
    torch.testing.assert_close(total, x.exp().sum())


def test_string_options_and_dimension_sizes_become_named_wildcards():
    """A Literal-annotated scalar (the loss's reduction) and a constant that is an input's size
    (the vocabulary in a view) bind by name, and the names carry the model's values."""

    from patterns.loss import LINEAR_CROSS_ENTROPY, hf_lm_head_causal_lm_loss

    nodes = list(LINEAR_CROSS_ENTROPY.graph.graph.nodes)
    names = {a.name for n in nodes for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, Wildcard)}
    assert {"reduction", "V"} <= names and not any(name.startswith("c") for name in names)

    hidden, weight = torch.randn(2, 7, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 7))
    for reduction in ("mean", "sum"):

        def model(h, w, y, reduction=reduction):
            return hf_lm_head_causal_lm_loss(h, w, y, reduction)

        gm = capture(model, hidden, weight, labels)
        matches, _ = find_matches(gm.graph, [LINEAR_CROSS_ENTROPY], no_module)
        assert len(matches) == 1
        assert matches[0].captures["reduction"] == reduction and matches[0].captures["V"] == 50
