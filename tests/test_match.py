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


def _rope_graph(project, reuse=lambda q_proj, k_proj, v_proj: None):
    """HF's apply_rotary_pos_emb on (B, H, S, D) views of the q and k that `project` makes (with
    a v); the graph also returns `reuse` of them (what else reads them). Returns the captured
    graph, its input values and the function."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def fn(x, w, cos, sin):
        q_proj, k_proj, v_proj = project(x, w)
        q = q_proj.view(2, 5, 2, 8).transpose(1, 2)
        k = k_proj.view(2, 5, 1, 8).transpose(1, 2)
        q_embed, k_embed = apply_rotary_pos_emb(q, k, cos, sin)
        return q_embed.sum() + k_embed.sum(), reuse(q_proj, k_proj, v_proj)

    args = (torch.randn(2, 5, 16), torch.randn(16, 32), torch.randn(1, 5, 8), torch.randn(1, 5, 8))
    return capture(fn, *args), args, fn


def _rope_replacement(gm):
    from patterns.rope import ROPE

    matches, rejections = find_matches(gm.graph, [ROPE], no_module)
    assert len(matches) == 1, rejections
    return matches[0]


def separate(x, w):
    return x @ w[:, :16], x @ w[:, 16:24], x @ w[:, 24:]


def split_from_one(x, w):  # one q|k|v product, split: the parts are disjoint views of it
    return (x @ w).split([16, 8, 8], dim=-1)


def test_rope_runs_in_place_only_where_the_graph_proves_q_and_k_die_in_the_match():
    from patterns.rope import replace_rope, replace_rope_in_place

    qkv = {}

    def split_kept(x, w):  # the q|k|v product itself read again
        qkv["product"] = x @ w
        return qkv["product"].split([16, 8, 8], dim=-1)

    def cast_after(x, w):  # .to(its own dtype) returns the tensor itself: an alias
        q, k, v = separate(x, w)
        qkv["q before the cast"] = q
        return q.to(torch.float32), k, v

    in_place = {
        "projections read by rope alone": _rope_graph(separate),
        "v's projection read elsewhere": _rope_graph(separate, lambda q, k, v: v * 2),
        "through a dtype cast that is a no-op (an alias)": _rope_graph(
            lambda x, w: [p.to(torch.float32) for p in separate(x, w)]
        ),
    }
    out_of_place = {
        # the parts of one product share its storage: that they are disjoint is not proven
        "q|k|v split from one product": _rope_graph(split_from_one),
        "q's projection read again, rope reading it through a no-op cast": _rope_graph(
            cast_after, lambda q, k, v: qkv["q before the cast"].sum()
        ),
        "q's projection read again": _rope_graph(separate, lambda q, k, v: q.mean()),
        "k's projection returned as well": _rope_graph(separate, lambda q, k, v: k),
        "q|k|v product read whole elsewhere": _rope_graph(split_kept, lambda q, k, v: qkv["product"].sum()),
    }
    for why, (gm, _, _) in in_place.items():
        assert _rope_replacement(gm).replace is replace_rope_in_place, why
    for why, (gm, _, _) in out_of_place.items():
        assert _rope_replacement(gm).replace is replace_rope, why


def test_rope_in_place_computes_what_the_graph_did():
    gm, args, fn = _rope_graph(separate, lambda q, k, v: v * 2)
    rewritten = rewrite(gm, [_rope_replacement(gm)])
    _, inputs = trace(fn, args)
    for got, want in zip(rewritten(*inputs), fn(*args)):
        torch.testing.assert_close(got, want)


def test_rope_on_a_graph_input_or_on_one_tensor_twice_stays_out_of_place():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from patterns.rope import ROPE, replace_rope

    def given(q, k, cos, sin):  # q and k are the caller's tensors
        return apply_rotary_pos_emb(q, k, cos, sin)

    def twice(x, cos, sin):  # one tensor as both q and k
        q = (x * 2).view(2, 5, 2, 8).transpose(1, 2)
        return apply_rotary_pos_emb(q, q, cos, sin)

    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    for gm in (
        capture(given, torch.randn(2, 2, 5, 8), torch.randn(2, 1, 5, 8), cos, sin),
        capture(twice, torch.randn(2, 5, 16), cos, sin),
    ):
        matches, _ = find_matches(gm.graph, [ROPE], no_module)
        assert all(m.replace is replace_rope for m in matches) and matches
