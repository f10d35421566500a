"""RoPE kernel: forward, dq and dk (and dcos, dsin when asked) against float64, on fresh random
inputs laid out as HF lays them out: q and k as transposed views of the projection outputs."""

import pytest
import torch
from numerics import assert_close_to_fp64

from kernels.rope import RoPEFunction, rope, rope_reference, rope_unsupported

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def projection_views(batch, seq, heads, dim, dtype):
    """(B, H, S, D) views of a (B, S, H * D) projection output, as LlamaAttention makes them."""
    proj = torch.randn(batch, seq, heads * dim, dtype=torch.float64).to(dtype)
    return proj.view(batch, seq, heads, dim).transpose(1, 2)


def rope_fp64(q, k, cos, sin):
    """The math written directly in float64 (no HF code, no casts)."""

    def rot(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + rot(q) * s, k * c + rot(k) * s


def run(fn, q, k, cos, sin, dq_out, dk_out, wrt=("q", "k")):
    """Outputs and the gradients of the inputs named in `wrt`."""
    args = {"q": q, "k": k, "cos": cos, "sin": sin}
    leaves = {n: t.detach().requires_grad_(n in wrt) for n, t in args.items()}
    qo, ko = fn(*leaves.values())
    pairs = [(o, c.to(o.dtype)) for o, c in ((qo, dq_out), (ko, dk_out)) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], [leaves[n] for n in wrt], [c for _, c in pairs])
    return [qo.detach(), ko.detach(), *grads]


def check_all(dtype, q, k, cos, sin, wrt=("q", "k"), label=""):
    dq_out = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    dk_out = torch.randn(k.shape, dtype=torch.float64).to(dtype)
    ours = run(RoPEFunction.apply, q, k, cos, sin, dq_out, dk_out, wrt)
    eager = run(rope_reference, q, k, cos, sin, dq_out, dk_out, wrt)
    ref = run(rope_fp64, *(t.double() for t in (q, k, cos, sin, dq_out, dk_out)), wrt)
    names = ["q_embed", "k_embed"] + [f"d{n}" for n in wrt]
    for name, o, e, r in zip(names, ours, eager, ref):
        assert o.dtype == e.dtype and o.shape == e.shape, name
        assert_close_to_fp64(f"{name} {dtype} {label}", o, e, r)
    return ours, eager


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("cos_batch", [1, 3], ids=["cos-broadcast", "cos-per-sequence"])
def test_matches_float64_within_eager_error(dtype, head_dim, cos_batch):
    """3 sequences of 37 tokens, 32 q heads with 8 k heads; cos and sin random with unequal
    halves (the kernel must not assume HF's duplicated halves)."""
    q = projection_views(3, 37, 32, head_dim, dtype)
    k = projection_views(3, 37, 8, head_dim, dtype)
    cos = torch.randn(cos_batch, 37, head_dim, dtype=torch.float64).to(dtype)
    sin = torch.randn(cos_batch, 37, head_dim, dtype=torch.float64).to(dtype)
    check_all(dtype, q, k, cos, sin, label=f"D={head_dim} cos batch {cos_batch}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_sequences_and_odd_shapes(dtype):
    """Real rotary tables at per-token positions (two sequences packed into one row), head_dim
    96 (a half of 48 is not a power of two), 5 q heads over 3 k heads, contiguous (B, H, S, D)."""
    dim, heads_q, heads_k = 96, 5, 3
    positions = torch.cat([torch.arange(20), torch.arange(17)]).double()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None]  # (1, 37, D), HF's layout
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q = torch.randn(1, heads_q, 37, dim, dtype=torch.float64).to(dtype)
    k = torch.randn(1, heads_k, 37, dim, dtype=torch.float64).to(dtype)
    check_all(dtype, q, k, cos, sin, label="packed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_heads_than_one_tile_holds(dtype):
    """64 q heads of 128 exceed a forward tile (2048 elements of a half-row: 32 heads), so the
    kernel rotates q 32 heads at a time rather than loading all heads before its first store."""
    q = projection_views(2, 9, 64, 128, dtype)
    k = projection_views(2, 9, 8, 128, dtype)
    cos = torch.randn(1, 9, 128, dtype=torch.float64).to(dtype)
    sin = torch.randn(1, 9, 128, dtype=torch.float64).to(dtype)
    check_all(dtype, q, k, cos, sin, label="64 heads")


def test_forward_keeps_hf_cast_points_bit_for_bit():
    """HF rounds q * cos, rotate_half(q) * sin and their sum to bf16 each: so do we."""
    q = projection_views(2, 11, 4, 64, torch.bfloat16)
    k = projection_views(2, 11, 2, 64, torch.bfloat16)
    cos, sin = (torch.randn(1, 11, 64, dtype=torch.bfloat16) for _ in range(2))
    for ours, eager in zip(RoPEFunction.apply(q, k, cos, sin), rope_reference(q, k, cos, sin)):
        assert torch.equal(ours, eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_cos_and_sin_gradients_when_they_require_grad(dtype, cos_batch):
    q = projection_views(2, 13, 4, 64, dtype)
    k = projection_views(2, 13, 2, 64, dtype)
    cos = torch.randn(cos_batch, 13, 64, dtype=torch.float64).to(dtype)
    sin = torch.randn(cos_batch, 13, 64, dtype=torch.float64).to(dtype)
    check_all(dtype, q, k, cos, sin, wrt=("q", "k", "cos", "sin"), label="with dcos dsin")
    check_all(dtype, q, k, cos, sin, wrt=("sin",), label="dsin alone")


def test_only_q_requires_grad():
    q = projection_views(2, 9, 4, 64, torch.bfloat16).requires_grad_()
    k = projection_views(2, 9, 2, 64, torch.bfloat16)
    cos, sin = (torch.randn(1, 9, 64, dtype=torch.bfloat16) for _ in range(2))
    check_all(torch.bfloat16, q, k, cos, sin, wrt=("q",), label="dq alone")
    qo, ko = RoPEFunction.apply(q, k, cos, sin)
    (qo.sum() + ko.sum()).backward()
    assert q.grad is not None and k.grad is None


def test_layouts_follow_the_projection_so_backward_views_are_free():
    """q_embed keeps q's memory layout (as eager's elementwise ops do), and dq is written in
    the projection's layout, so transposing it back to (B, S, H, D) needs no copy."""
    q = projection_views(2, 9, 4, 64, torch.float32).requires_grad_()
    k = projection_views(2, 9, 2, 64, torch.float32).requires_grad_()
    cos, sin = (torch.randn(1, 9, 64) for _ in range(2))
    qo, ko = RoPEFunction.apply(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (torch.randn_like(qo), torch.randn_like(ko)))
    assert dq.transpose(1, 2).is_contiguous() and dk.transpose(1, 2).is_contiguous()


def test_saves_only_cos_and_sin():
    q = projection_views(2, 9, 4, 64, torch.bfloat16).requires_grad_()
    k = projection_views(2, 9, 2, 64, torch.bfloat16).requires_grad_()
    cos, sin = (torch.randn(1, 9, 64, dtype=torch.bfloat16) for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        RoPEFunction.apply(q, k, cos, sin)
    assert [t.data_ptr() for t in saved] == [cos.data_ptr(), sin.data_ptr()]


def test_unsupported_inputs_fall_back_with_a_reason():
    q, k = torch.randn(1, 2, 5, 7), torch.randn(1, 1, 5, 7)
    cos, sin = torch.randn(1, 5, 7), torch.randn(1, 5, 7)
    assert "odd" in rope_unsupported(q, k, cos, sin)
    for ours, eager in zip(rope(q, k, cos, sin), rope_reference(q, k, cos, sin)):
        assert torch.equal(ours, eager)
    q, k = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 1, 5, 8, dtype=torch.float64)
    assert "unsupported dtypes" in rope_unsupported(q, k, torch.randn(1, 5, 8), torch.randn(1, 5, 8))
    assert "do not fit" in rope_unsupported(q.float(), k.float(), torch.randn(1, 4, 8), torch.randn(1, 4, 8))


def test_empty_sequence():
    q = torch.randn(2, 4, 0, 64, requires_grad=True)
    k = torch.randn(2, 2, 0, 64, requires_grad=True)
    cos, sin = torch.randn(1, 0, 64), torch.randn(1, 0, 64)
    qo, ko = rope(q, k, cos, sin)
    (qo.sum() + ko.sum()).backward()
    assert qo.shape == q.shape and q.grad.shape == q.shape


def projection_outputs(batch, seq, heads, dim, dtype, op=lambda w: w + 0):
    """A leaf weight w and (B, H, S, D) views of op(w), a non-leaf (B, S, H * D) tensor as a
    projection's output is; op(w) is the base that an in-place rotation writes through the view."""
    w = torch.randn(batch, seq, heads * dim, dtype=torch.float64).to(dtype).requires_grad_()
    base = op(w)
    return w, base, base.view(batch, seq, heads, dim).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_gives_the_out_of_place_bits_and_writes_over_q_k_and_the_gradient(dtype):
    """inplace=True: the same outputs and gradients bit for bit; q_embed lives in q's memory
    (the projection output's) and dq in the incoming gradient's."""
    results = []
    for inplace in (False, True):
        torch.manual_seed(0)
        wq, base_q, q = projection_outputs(3, 37, 8, 64, dtype)
        wk, base_k, k = projection_outputs(3, 37, 2, 64, dtype)
        cos, sin = (torch.randn(1, 37, 64, dtype=torch.float64).to(dtype) for _ in range(2))
        dq_out, dk_out = torch.randn(q.shape, dtype=dtype), torch.randn(k.shape, dtype=dtype)
        dq_in = torch.empty_like(q).copy_(dq_out)  # q's layout: the one attention's backward hands over
        qo, ko = rope(q, k, cos, sin, inplace=inplace)
        assert (qo.data_ptr() == base_q.data_ptr()) == inplace and (ko.data_ptr() == base_k.data_ptr()) == inplace
        dwq, dwk = torch.autograd.grad((qo, ko), (wq, wk), (dq_in, dk_out))
        assert (dwq.data_ptr() == dq_in.data_ptr()) == inplace  # dq written over dq_embed, then free views
        results.append([qo.detach().clone(), ko.detach().clone(), dwq, dwk])
    for name, a, b in zip(["q_embed", "k_embed", "dq", "dk"], *results):
        assert torch.equal(a, b), name


def test_in_place_raises_where_the_rotated_tensor_was_saved_for_backward():
    """exp saves its output for backward: rotating that output in place must make autograd
    raise (the version counter), never let exp's backward read rotated values."""
    wq, _, q = projection_outputs(1, 5, 2, 64, torch.float32, op=torch.exp)
    wk, _, k = projection_outputs(1, 5, 1, 64, torch.float32)
    cos, sin = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    qo, ko = rope(q, k, cos, sin, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (qo.sum() + ko.sum()).backward()


def test_in_place_stays_out_of_place_when_cos_and_sin_need_gradients():
    wq, base_q, q = projection_outputs(1, 5, 2, 64, torch.float32)
    wk, _, k = projection_outputs(1, 5, 1, 64, torch.float32)
    cos, sin = (torch.randn(1, 5, 64, requires_grad=True) for _ in range(2))
    before = base_q.detach().clone()
    qo, ko = rope(q, k, cos, sin, inplace=True)
    assert torch.equal(base_q.detach(), before) and qo.data_ptr() != base_q.data_ptr()
    dcos, dsin = torch.autograd.grad(qo.sum() + ko.sum(), (cos, sin))
    assert dcos.shape == cos.shape and dsin.shape == sin.shape
