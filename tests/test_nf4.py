"""4-bit dequantization (kernels/nf4.py): bit-exact with bitsandbytes on weights bitsandbytes
quantized itself (bitsandbytes.functional.quantize_4bit, and a transformers model loaded with
BitsAndBytesConfig), for nf4/fp4, double quantization on/off, every block size, bf16/fp16/fp32.

"Bit-exact" is checked twice: torch.equal against bitsandbytes (which cannot tell -0.0 from
+0.0: bitsandbytes' own CPU paths disagree on the sign of FP4's zero, see kernels/nf4.py), and
bit pattern for bit pattern between our Triton kernel (interpreted) and our PyTorch reference.
"""

import tempfile

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from numerics import assert_close_to_fp64
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from kernels.nf4 import (
    BLOCKSIZES,
    Nf4Weight,
    code_table,
    dequantize,
    dequantize_4bit,
    dequantize_reference,
    dequantize_triton,
    matmul_4bit,
    matmul_4bit_reference,
    matmul_unsupported_reason,
    unsupported_reason,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bnb_dequantize(packed: torch.Tensor, qs) -> torch.Tensor:
    """bitsandbytes' own dequantization of (packed, qs) on CPU.

    bitsandbytes 0.50.2's CPU kernel, on its AVX512 path, looks absmax up per row, which is wrong
    when a row is not a whole number of blocks (its CUDA kernel, its quantizer and its
    pure-PyTorch backend all use flat blocks). For those shapes we take the pure-PyTorch backend,
    which bitsandbytes itself runs on CPU for odd row lengths and block sizes >= 2048."""
    if qs.shape[-1] % qs.blocksize == 0:
        return bnbf.dequantize_4bit(packed, qs)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = qs.absmax
    if qs.nested:  # as bitsandbytes.functional.dequantize_4bit does it
        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2)
        absmax += qs.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile
    code = _get_4bit_code(qs.quant_type, packed.device)
    return compute(packed.view(torch.uint8).reshape(-1), absmax.float(), code, qs.blocksize, qs.shape, qs.dtype)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (a.view(_INT_VIEW[a.dtype]) != b.view(_INT_VIEW[b.dtype])).sum().item()
    assert diff == 0, f"{diff} of {a.numel()} values differ in their bits"


def quantize(shape, dtype, quant_type, blocksize, nested, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.05).to(dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested, **kwargs)
    return w, packed, qs


def check_against_bitsandbytes(w, packed, qs):
    expected = bnb_dequantize(packed, qs)
    ours = dequantize_4bit(packed, qs)  # the public entry: Triton in the interpreter here
    assert ours.dtype == qs.dtype == w.dtype and ours.shape == w.shape
    assert torch.equal(ours, expected)
    return ours


def test_code_tables_are_bitsandbytes_tables():
    assert_same_bits(code_table("nf4"), bnbf.get_4bit_type("nf4", device="cpu"))
    # FP4 code 8 is -0.0 in bitsandbytes' CUDA kernel (lut[0] * sign) and +0.0 in its Python
    # table (the literal -0 is an int): we follow CUDA; the values are equal.
    fp4, bnb_fp4 = code_table("fp4"), bnbf.get_4bit_type("fp4", device="cpu")
    assert torch.equal(fp4, bnb_fp4) and torch.signbit(fp4[8]) and not torch.signbit(bnb_fp4[8])
    assert_same_bits(fp4[torch.arange(16) != 8], bnb_fp4[torch.arange(16) != 8])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", [(37, 192), (5, 7), (3, 333)])
def test_small_odd_shapes_every_blocksize(shape, blocksize, quant_type, nested, dtype):
    """Rows that are not whole blocks (192 at blocksize >= 128, 7, 333) and odd value counts."""
    w, packed, qs = quantize(shape, dtype, quant_type, blocksize, nested, seed=blocksize)
    ours = check_against_bitsandbytes(w, packed, qs)
    assert_same_bits(ours, dequantize_reference(Nf4Weight.from_quant_state(packed, qs)))
    # The right layout gives back the weights up to 4-bit error (a wrong block scale would not).
    rel = ((ours.double() - w.double()).norm() / w.double().norm()).item()
    assert rel < (0.12 if quant_type == "nf4" else 0.2), rel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_1000x4096(blocksize, quant_type, nested, dtype):
    w, packed, qs = quantize((1000, 4096), dtype, quant_type, blocksize, nested, seed=1)
    ours = check_against_bitsandbytes(w, packed, qs)
    assert_same_bits(ours, dequantize_reference(Nf4Weight.from_quant_state(packed, qs)))


@pytest.mark.parametrize(
    "quant_type, nested, dtype, blocksize",
    [("nf4", True, torch.bfloat16, 64), ("fp4", False, torch.float16, 128), ("nf4", False, torch.float32, 256)],
)
def test_4096x11008(quant_type, nested, dtype, blocksize):
    w, packed, qs = quantize((4096, 11008), dtype, quant_type, blocksize, nested, seed=2)
    check_against_bitsandbytes(w, packed, qs)


def test_quant_storage_other_than_uint8():
    """FSDP-QLoRA stores the codes in a bf16 tensor; the bytes are the same."""
    w, packed, qs = quantize((64, 256), torch.bfloat16, "nf4", 64, True, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    check_against_bitsandbytes(w, packed, qs)


def test_out_buffer_is_reused_and_checked():
    w, packed, qs = quantize((96, 128), torch.bfloat16, "nf4", 64, True)
    weight = Nf4Weight.from_quant_state(packed, qs)
    buffer = torch.full((96, 128), float("nan"), dtype=torch.bfloat16)
    result = dequantize(weight, out=buffer)
    assert result.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, bnbf.dequantize_4bit(packed, qs))
    with pytest.raises(ValueError, match="needs"):
        dequantize(weight, out=torch.empty(96, 128, dtype=torch.float16))
    with pytest.raises(ValueError, match="needs"):
        dequantize(weight, out=torch.empty(128, 96, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize(weight, out=torch.empty(128, 96, dtype=torch.bfloat16).t())


@pytest.mark.parametrize("shape, blocksize", [((96, 128), 64), ((37, 96), 64), ((5, 4096), 256)])
def test_out_may_be_the_first_columns_of_a_wider_buffer(shape, blocksize):
    """The LoRA fold dequantizes into the first K columns of an (N, K + e) buffer; blocks may
    cross row ends (96 % 64 != 0); the extra columns are left as they were."""
    w, packed, qs = quantize(shape, torch.bfloat16, "nf4", blocksize, True, seed=7)
    weight = Nf4Weight.from_quant_state(packed, qs)
    for dequant in (dequantize_triton, dequantize_reference):
        wide = torch.full((shape[0], shape[1] + 24), float("nan"), dtype=torch.bfloat16)
        dequant(weight, out=wide[:, : shape[1]])
        assert_same_bits(wide[:, : shape[1]], dequant(weight))  # bnb's CPU kernel is wrong at 37 x 96
        assert wide[:, shape[1] :].isnan().all()


def test_reference_path_is_the_same_math():
    """Without the interpreter the public function runs the PyTorch reference: same bits."""
    w, packed, qs = quantize((33, 320), torch.float16, "fp4", 64, True, seed=5)
    weight = Nf4Weight.from_quant_state(packed, qs)
    assert_same_bits(dequantize_triton(weight), dequantize_reference(weight))


def test_unsupported_states_are_refused_with_a_reason():
    w, packed, qs = quantize((64, 128), torch.bfloat16, "nf4", 64, True)
    assert unsupported_reason(packed, qs) is None
    assert "bytes" in unsupported_reason(packed[:100], qs)
    with pytest.raises(ValueError, match="bytes"):
        Nf4Weight.from_quant_state(packed[:100], qs)
    # bitsandbytes' 8-bit blockwise state is a QuantState with no 4-bit quant_type.
    q8, qs8 = bnbf.quantize_blockwise(w)
    assert "quant_type" in unsupported_reason(q8, qs8)
    assert "not a bitsandbytes 4-bit QuantState" in unsupported_reason(packed, object())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_linear4bit_of_a_quantized_llama(dtype):
    """A tiny Llama saved and loaded through transformers with QLoRA's BitsAndBytesConfig."""
    from models import tiny_causal_lm

    model = tiny_causal_lm("llama", lora=False, dtype=dtype)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        quantized = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, dtype=dtype, device_map="cpu"
        )
    originals = dict(model.named_parameters())
    layers = [(name, m) for name, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * len(quantized.model.layers)
    for name, module in layers:
        param = module.weight
        assert param.quant_state.nested and param.quant_state.dtype == dtype
        ours = dequantize(Nf4Weight.from_param(param))
        assert torch.equal(ours, bnb_dequantize(param.data, param.quant_state)), name
        original = originals[name + ".weight"]
        rel = ((ours.double() - original.double()).norm() / original.double().norm()).item()
        assert rel < 0.12, f"{name}: {rel}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(
    "m, n, k, blocksize, quant_type",
    [(37, 200, 192, 64, "nf4"), (70, 130, 256, 128, "fp4"), (5, 96, 512, 256, "nf4")],
)
def test_matmul_within_eager_error_of_float64(m, n, k, blocksize, quant_type, transpose, nested, dtype):
    """x @ W^T (forward) and x @ W (the backward's dx) with W (n, k) dequantized tile by tile,
    against float64 on the same dequantized W, within eager's (dequantize + torch.matmul) error."""
    _, packed, qs = quantize((n, k), dtype, quant_type, blocksize, nested, seed=m)
    weight = Nf4Weight.from_quant_state(packed, qs)
    x = torch.randn(m, n if transpose else k, dtype=torch.float64).to(dtype)
    w64 = bnb_dequantize(packed, qs).double()
    ref = x.double() @ (w64 if transpose else w64.t())
    ours = matmul_4bit(x, weight, transpose)
    eager = matmul_4bit_reference(x, weight, transpose)
    assert ours.dtype == dtype
    assert_close_to_fp64(f"matmul transpose={transpose} {dtype}", ours, eager, ref)


@pytest.mark.parametrize("transpose", [False, True])
def test_matmul_tiles_are_the_dequantized_weight(transpose):
    """Against the identity every output is one product with 1: the tiles, bit for bit."""
    _, packed, qs = quantize((96, 320), torch.bfloat16, "nf4", 64, True, seed=3)
    weight = Nf4Weight.from_quant_state(packed, qs)
    w = dequantize(weight)
    eye = torch.eye(96 if transpose else 320, dtype=torch.bfloat16)
    assert_same_bits(matmul_4bit(eye, weight, transpose), w if transpose else w.t().contiguous())


def test_matmul_leading_dims_and_refusals():
    _, packed, qs = quantize((64, 192), torch.bfloat16, "nf4", 64, True)
    weight = Nf4Weight.from_quant_state(packed, qs)
    x = torch.randn(2, 3, 192, dtype=torch.bfloat16)
    assert matmul_4bit(x, weight).shape == (2, 3, 64)
    assert "float16" in matmul_unsupported_reason(x.half(), weight)
    _, packed, qs = quantize((64, 160), torch.bfloat16, "nf4", 64, True)
    assert "multiple of blocksize" in matmul_unsupported_reason(x, Nf4Weight.from_quant_state(packed, qs))
