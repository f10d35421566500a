"""SwiGLU kernel: h = silu(e) * g, de and dg against float64, on fresh random inputs."""

import pytest
import torch
from numerics import assert_close_to_fp64

from kernels.swiglu import SwiGLUFunction, silu_mul, silu_mul_backward, swiglu, swiglu_reference, swiglu_unsupported

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def swiglu_fp64(e, g):
    """The math written directly in float64."""
    return e * torch.sigmoid(e) * g


def run(fn, e, g, dh, wrt=(0, 1)):
    leaves = [e.detach().requires_grad_(0 in wrt), g.detach().requires_grad_(1 in wrt)]
    h = fn(*leaves)
    grads = torch.autograd.grad(h, [leaves[i] for i in wrt], dh.to(h.dtype))
    return [h.detach(), *grads]


def check_all(dtype, e, g, wrt=(0, 1), label=""):
    dh = torch.randn(e.shape, dtype=torch.float64).to(dtype)
    ours = run(SwiGLUFunction.apply, e, g, dh, wrt)
    eager = run(swiglu_reference, e, g, dh, wrt)
    ref = run(swiglu_fp64, e.double(), g.double(), dh.double(), wrt)
    names = ["h"] + [("de", "dg")[i] for i in wrt]
    for name, o, e_, r in zip(names, ours, eager, ref):
        assert o.dtype == e_.dtype and o.shape == e_.shape, name
        assert_close_to_fp64(f"{name} {dtype} {label}", o, e_, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 1000), (2, 5, 14336), (1001,)])
def test_matches_float64_within_eager_error(dtype, shape):
    """Gate values spread over [-12, 12] so that both tails of the sigmoid are exercised."""
    e = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    check_all(dtype, e, g, label=str(shape))


@pytest.mark.parametrize("wrt", [(0,), (1,)], ids=["gate only", "up only"])
def test_one_input_requires_grad(wrt):
    e = torch.randn(5, 300, dtype=torch.bfloat16)
    g = torch.randn(5, 300, dtype=torch.bfloat16)
    check_all(torch.bfloat16, e, g, wrt=wrt)


def test_forward_keeps_hf_cast_points():
    """HF rounds silu(e) to bf16 before the product: so do we (the sigmoid itself may differ
    from PyTorch's in the last fp32 bit, which almost never survives rounding to bf16)."""
    e = torch.randn(64, 512, dtype=torch.bfloat16) * 3
    g = torch.randn(64, 512, dtype=torch.bfloat16)
    ours, eager = SwiGLUFunction.apply(e, g), swiglu_reference(e, g)
    assert (ours != eager).float().mean().item() < 1e-3


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(1e4) = inf, as intended
def test_extreme_gates_stay_finite():
    e = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4])
    g = torch.ones(7)
    e.requires_grad_()
    h = SwiGLUFunction.apply(e, g)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(e.grad).all()
    torch.testing.assert_close(h.detach(), swiglu_reference(e.detach(), g))


def test_saves_only_gate_and_up():
    e = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        SwiGLUFunction.apply(e, g)
    assert [t.data_ptr() for t in saved] == [e.data_ptr(), g.data_ptr()]


def test_non_contiguous_inputs():
    e = torch.randn(300, 6, dtype=torch.float64).to(torch.bfloat16).t()
    g = torch.randn(6, 300, dtype=torch.float64).to(torch.bfloat16)
    check_all(torch.bfloat16, e, g, label="transposed gate")


def test_unsupported_inputs_fall_back_with_a_reason():
    e, g = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert "unsupported dtypes" in swiglu_unsupported(e, g)
    assert torch.equal(swiglu(e, g), swiglu_reference(e, g))
    e, g = torch.randn(3, 8), torch.randn(1, 8)
    assert "differ" in swiglu_unsupported(e, g)
    assert torch.equal(swiglu(e, g), swiglu_reference(e, g))
    assert "unsupported dtypes" in swiglu_unsupported(torch.randn(3, 8), torch.randn(3, 8, dtype=torch.bfloat16))


def test_empty():
    e = torch.randn(0, 64, requires_grad=True)
    g = torch.randn(0, 64, requires_grad=True)
    h = swiglu(e, g)
    h.sum().backward()
    assert h.shape == (0, 64) and e.grad.shape == (0, 64)


# Launch settings (module constants) the benchmark's --sweep times: each must give the
# default's bits. Names as in kernels/swiglu.py; on the interpreter PROGRAMS_PER_SM counts 2 SMs.
LAUNCH_SETTINGS = [
    dict(LOADS_FIRST=True),
    dict(FLAT=True, LOADS_FIRST=True),
    dict(EVICT_FIRST=True, BLOCK=512, NUM_WARPS=2),
    dict(BLOCK=2048, NUM_WARPS=8, BLOCK_BACKWARD=256, NUM_WARPS_BACKWARD=2),
    dict(ROWS=2, BLOCK=256),
    dict(ROWS=4, FLAT=True, LOADS_FIRST=True),
    dict(PROGRAMS_PER_SM=1, BLOCK=256),
    dict(PROGRAMS_PER_SM=3, ROWS=2, BLOCK=128, LOADS_FIRST=True),
]


def set_launch(monkeypatch, settings):
    import kernels.swiglu as module

    for name, value in settings.items():
        assert hasattr(module, name), name
        monkeypatch.setattr(module, name, value)


@pytest.mark.parametrize("settings", LAUNCH_SETTINGS, ids=lambda s: " ".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("shape", [(3, 37, 1000), (1001,), (6, 2048)], ids=["masked", "1-D", "even"])
def test_launch_settings_give_the_default_bits(monkeypatch, settings, shape):
    e = (torch.randn(shape, dtype=torch.float64) * 4).to(torch.bfloat16)
    g = torch.randn(shape, dtype=torch.float64).to(torch.bfloat16)
    dh = torch.randn(shape, dtype=torch.float64).to(torch.bfloat16)
    default = run(SwiGLUFunction.apply, e, g, dh)
    set_launch(monkeypatch, settings)
    for name, ours, theirs in zip(["h", "de", "dg"], run(SwiGLUFunction.apply, e, g, dh), default):
        assert torch.equal(ours, theirs), name
    for wrt in [(0,), (1,)]:  # one gradient alone
        for ours, theirs in zip(run(SwiGLUFunction.apply, e, g, dh, wrt)[1:], default[1 + wrt[0] :]):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_persistent_2d_tiles_match_float64(monkeypatch, dtype):
    set_launch(monkeypatch, dict(ROWS=2, BLOCK=512, PROGRAMS_PER_SM=2, LOADS_FIRST=True))
    e = (torch.randn(3, 37, 1000, dtype=torch.float64) * 4).to(dtype)
    g = torch.randn(3, 37, 1000, dtype=torch.float64).to(dtype)
    check_all(dtype, e, g, label="ROWS=2 PROGRAMS_PER_SM=2")
    set_launch(monkeypatch, dict(ROWS=1, FLAT=True, PROGRAMS_PER_SM=0))
    check_all(dtype, e, g, label="FLAT")


def column_blocks(rows, cols, dtype=torch.bfloat16):
    """e and g as the two column blocks of one (rows, 2 cols) GEMM output, as kernels/lora.py has them."""
    eg = torch.randn(rows, 2 * cols, dtype=torch.float64).to(dtype)
    eg[:, :cols] *= 4
    return eg[:, :cols], eg[:, cols:]


@pytest.mark.parametrize("settings", [{}, dict(FLAT=True, ROWS=2, BLOCK=256)], ids=["default", "flat-rows"])
def test_silu_mul_writes_into_the_first_columns_of_a_wider_buffer(monkeypatch, settings):
    """out = the first N columns of an (M, N + 64) buffer, as kernels/lora.py passes it: written
    in place (no temporary), the other columns untouched; e and g strided or dense (FLAT must
    not take the strided out for dense)."""
    import kernels.swiglu as module

    set_launch(monkeypatch, settings)
    e, g = column_blocks(37, 1000)
    expected = silu_mul(e.contiguous(), g.contiguous())
    for e_, g_ in [(e, g), (e.contiguous(), g.contiguous())]:
        wide = torch.full((37, 1000 + 64), 7.0, dtype=torch.bfloat16)
        out = wide[:, :1000]
        assert module._out_rows(out, e_, e_.shape).data_ptr() == out.data_ptr()  # the direct path
        assert silu_mul(e_, g_, out=out) is out
        assert torch.equal(out, expected)
        assert (wide[:, 1000:] == 7.0).all()


def test_silu_mul_out_of_any_layout_or_dtype():
    """An out that does not view as rows (transposed) or has another dtype: written through a
    temporary, same values; an out of another shape is refused."""
    e, g = column_blocks(9, 40, torch.float32)
    h = silu_mul(e, g)
    out_t = torch.empty(40, 9).t()
    assert silu_mul(e, g, out=out_t) is out_t and torch.equal(out_t, h)
    out_3d = torch.empty(3, 3, 40)
    assert torch.equal(silu_mul(e.reshape(3, 3, 40), g.reshape(3, 3, 40), out=out_3d), h.view(3, 3, 40))
    out_f64 = torch.empty(9, 40, dtype=torch.float64)
    assert torch.equal(silu_mul(e, g, out=out_f64), h.double())
    with pytest.raises(ValueError, match="shape"):
        silu_mul(e, g, out=torch.empty(9, 41))


@pytest.mark.parametrize("settings", [{}, dict(LOADS_FIRST=True, FLAT=True)], ids=["default", "loads-first"])
def test_backward_into_column_blocks_of_one_buffer(monkeypatch, settings):
    """dh, e, g and de/dg as column blocks of stacked buffers (kernels/lora.py's [de | dg])."""
    set_launch(monkeypatch, settings)
    e, g = column_blocks(37, 1000)
    dh = torch.randn(37, 1000, dtype=torch.float64).to(torch.bfloat16)
    deg = torch.full((37, 2000), 7.0, dtype=torch.bfloat16)
    de, dg = deg.split([1000, 1000], dim=1)
    silu_mul_backward(dh, e, g, de, dg)
    _, de_ref, dg_ref = run(SwiGLUFunction.apply, e.contiguous(), g.contiguous(), dh)
    assert torch.equal(de, de_ref) and torch.equal(dg, dg_ref)
    one = torch.full((37, 1000), 7.0, dtype=torch.bfloat16)
    silu_mul_backward(dh, e, g, None, one)
    assert torch.equal(one, dg_ref)
