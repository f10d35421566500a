"""Every Triton kernel, as our ops launch it, compiles for an H100/H200 (sm_90), without a GPU.

The other tests run the kernels in Triton's interpreter, which executes each branch as Python
and never type-checks what the GPU compiler sees: a constexpr `if` with an early `return` in a
@triton.jit helper once passed every CPU test and failed to compile on the GPU ("Both operands
must be same dtype"; this file catches it). Here the public ops run forward and backward on
small CPU tensors (in the interpreter) while every kernel launch is recorded: the kernel, the
types of its arguments, its constexprs and its launch options (num_warps, enable_fp_fusion, ...).
Each distinct configuration is then compiled with triton.compile for GPUTarget("cuda", 90, 32)
down to a cubin (ptxas ships with Triton), in worker processes without the interpreter.

Launches are recorded twice per op group: with the launch choices the CPU code path makes
(`cpu_launch`), and with the device-dependent ones switched to a CUDA device's (`cuda_launch`:
tile sizes, the SM count behind grid splits, nf4's matmul tiles and its bf16 dots, which the
interpreter widens to fp32), so the configurations a GPU actually builds are covered too. In
both, nf4's dequantize takes the GPU's tile (see `record`).

Signature, as on a launch but simplified: a tensor is "*" + its Triton dtype, a Python int
"i32" or "i64" by magnitude, a float "fp32", a bool "i1", None a constexpr. Unlike a real launch,
ints equal to 1 are not specialised into constexprs and no divisibility hints are given: this
checks types and control flow, not the exact binary a GPU run would build.

Skipped, with the reason, where the kernels are not interpreted (TRITON_INTERPRET != 1) or this
Triton cannot build an sm_90 cubin (no CUDA backend, no ptxas).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton.language as tl

import kernels.runtime

TARGET_ARCH = 90
H200_SMS = 132
GPU_NF4_TILE = 8192  # kernels/nf4.py's _TILE when not interpreted

_TORCH_TO_TRITON = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


# ---------------------------------------------------------------------------------------------
# Recording launches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """One kernel configuration: what triton.compile needs, hashable so launches deduplicate."""

    kernel: object  # the interpreter's InterpretedFunction (has .fn, the Python function)
    signature: tuple[tuple[str, str], ...]  # every parameter, in order: (name, type or "constexpr")
    constexprs: tuple[tuple[str, object], ...]  # (name, value) of the constexpr parameters
    options: tuple[tuple[str, object], ...]  # launch options: num_warps, enable_fp_fusion, ...

    @property
    def key(self) -> tuple:
        fn = self.kernel.fn
        consts = tuple((k, repr(v)) for k, v in self.constexprs)
        return (fn.__module__, fn.__qualname__, self.signature, consts, self.options)

    @property
    def label(self) -> str:
        fn = self.kernel.fn
        consts = ", ".join(f"{k}={_show(v)}" for k, v in self.constexprs)
        types = ",".join(t for _, t in self.signature if t != "constexpr")
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{fn.__module__}.{fn.__name__}({types}) [{consts}] {{{opts}}}"


def _show(value) -> str:
    return value.name if isinstance(value, tl.dtype) else repr(value)


def _is_constexpr_annotation(annotation) -> bool:
    if annotation is tl.constexpr:
        return True
    if isinstance(annotation, str):  # `from __future__ import annotations` in the kernel modules
        return annotation.replace(" ", "") in ("tl.constexpr", "constexpr", "triton.language.constexpr")
    return False


def _arg_type(name: str, value) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _TORCH_TO_TRITON:
            raise TypeError(f"argument {name}: no Triton type for tensor dtype {value.dtype}")
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if value is None:
        return "constexpr"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: no Triton signature type for {type(value).__name__} {value!r}")


def _launch_of(kernel, args: tuple, kwargs: dict) -> Launch:
    fn = kernel.fn
    params = inspect.signature(fn).parameters
    call_kwargs = {k: v for k, v in kwargs.items() if k in params}
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in params))
    bound = inspect.signature(fn).bind(*args, **call_kwargs)
    bound.apply_defaults()
    signature, constexprs = [], []
    for name, value in bound.arguments.items():
        if _is_constexpr_annotation(params[name].annotation) or value is None:
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
        else:
            signature.append((name, _arg_type(name, value)))
    return Launch(kernel, tuple(signature), tuple(constexprs), options)


def _interpreted_function_class():
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


@contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Record every interpreted kernel launch (fn[grid](...)) made inside the block; the kernels
    still run, so the ops' outputs (and the backward passes that follow them) are real."""
    interpreted = _interpreted_function_class()
    original_run = interpreted.run
    launches: list[Launch] = []

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            options = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            launches.append(_launch_of(self, args, options))
        return original_run(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreted, "run", run)
        yield launches


@contextmanager
def cuda_launch_choices() -> Iterator[None]:
    """The ops' device-dependent launch choices as on an H200, though the tensors are on the CPU
    (the interpreter still runs the launches: only tile sizes and grids change)."""
    import kernels.linear_cross_entropy as lce
    import kernels.lowrank as lowrank
    import kernels.nf4 as nf4
    import kernels.rmsnorm as rmsnorm

    cuda = torch.device("cuda")
    rmsnorm_shape = rmsnorm._launch_shape
    lce_block = lce._block_and_warps
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rmsnorm, "_launch_shape", lambda n, device: rmsnorm_shape(n, cuda))
        mp.setattr(lce, "_block_and_warps", lambda vocab, device: lce_block(vocab, cuda))
        for module in (rmsnorm, lowrank):
            mp.setattr(module, "num_programs_for_reduction", lambda device: 4 * H200_SMS)
        mp.setattr(nf4, "INTERPRET", False)  # matmul_4bit: GPU tiles, bf16 dots (no fp32 widening)
        yield


# ---------------------------------------------------------------------------------------------
# Driving the ops: small CPU tensors, forward and backward, every dtype the op takes
# ---------------------------------------------------------------------------------------------

FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _grad(outputs, inputs) -> None:
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    cotangents = [torch.randn_like(o) for o in outputs]
    torch.autograd.grad(outputs, inputs, cotangents)


def drive_rmsnorm() -> None:
    from kernels.rmsnorm import rmsnorm

    for x_dtype, w_dtype in [*((d, d) for d in FLOATS), (torch.bfloat16, torch.float32)]:
        for n in (64, 1000):
            x = torch.randn(3, 7, n, dtype=x_dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(n)).to(w_dtype).requires_grad_()
            _grad(rmsnorm(x, w, 1e-6), (x, w))
            x = x.detach().requires_grad_()  # weight frozen: no dw partials
            _grad(rmsnorm(x, w.detach(), 1e-6), (x,))


def drive_rope() -> None:
    from kernels.rope import rope

    for dtype in FLOATS:
        for head_dim, cos_batch in ((64, 1), (48, 2)):  # 48: half-rows of 24 in blocks of 32
            q = torch.randn(2, 5, 4, head_dim, dtype=dtype).transpose(1, 2)  # (B, H, S, D) views
            k = torch.randn(2, 5, 2, head_dim, dtype=dtype).transpose(1, 2)
            cos = torch.randn(cos_batch, 5, head_dim, dtype=dtype)
            sin = torch.randn(cos_batch, 5, head_dim, dtype=dtype)
            for wrt in (("q", "k"), ("q",), ("k",)):  # one side frozen: zero heads on the other
                leaves = {"q": q.detach().requires_grad_("q" in wrt), "k": k.detach().requires_grad_("k" in wrt)}
                outs = rope(leaves["q"], leaves["k"], cos, sin)
                _grad([o for o in outs if o.requires_grad], [leaves[n] for n in wrt])


def drive_swiglu() -> None:
    from kernels.swiglu import swiglu

    for dtype in FLOATS:
        for shape in ((3, 5, 100), (2, 1500)):
            for wrt in ((0, 1), (0,), (1,)):
                e = torch.randn(shape, dtype=dtype, requires_grad=0 in wrt)
                g = torch.randn(shape, dtype=dtype, requires_grad=1 in wrt)
                _grad(swiglu(e, g), [(e, g)[i] for i in wrt])


def drive_lowrank() -> None:
    from kernels import lowrank

    for dtype in FLOATS:
        for m, k, r in ((37, 100, 8), (20, 64, 48)):
            x = torch.randn(m, k, dtype=dtype)
            p = torch.randn(r, k) * 0.05
            u = torch.randn(m, r)
            lowrank.down(x, p, 0.5)
            lowrank.down(x, p.t().contiguous().t(), 0.5)  # strided factor, as for g = D B
            lowrank.grad(x, u, 0.5)
            for round_first in (False, True):
                y = torch.randn(m, k, dtype=dtype)
                lowrank.up_add_(y, u, torch.randn(k, r) * 0.1, 2.0, round_first=round_first)
        # segmented (q, k and v at once), with the smaller blocks that cuts at 32 or 64 need
        x, b, u = torch.randn(37, 192, dtype=dtype), torch.randn(192, 8) * 0.05, torch.randn(37, 24)
        for bounds in ((64, 96), (128,)):
            lowrank.down(x, b.t(), (0.5, 2.0, 1.5)[: len(bounds) + 1], bounds)
            lowrank.grad(x, u, (0.5, 2.0, 1.5)[: len(bounds) + 1], bounds, rank=8)
            lowrank.up_add_(x.clone(), u, b, (0.5, 2.0, 1.5)[: len(bounds) + 1], bounds=bounds)
            lowrank.grad_and_down(x, u, b.t(), (0.5, 2.0, 1.5)[: len(bounds) + 1], bounds, rank=8)
        for config in (dict(parts="chained"), dict(block_m=32, block_k=16)):
            lowrank.down(x, b.t(), 0.5, config=config)
            lowrank.grad(x, u, 0.5, config=config)


def drive_fold() -> None:
    from kernels import fold

    for dtype in FLOATS:  # stack_into's one-launch path (q|k|v's gradient widths of 128s)
        wide = torch.empty(5, 512 + 32, dtype=dtype)
        fold.stack_into(wide[:, :512], [torch.randn(5, w, dtype=dtype) for w in (256, 128, 128)])
    # swiglu's backward writing h over dh (the fused MLP's down dA)
    from kernels.swiglu import silu_mul_backward

    e, g, dh = (torch.randn(3, 100, dtype=torch.bfloat16) for _ in range(3))
    silu_mul_backward(dh, e, g, torch.empty_like(e), torch.empty_like(g), dh)


def _dense_projection(n_out: int, n_in: int, dtype: torch.dtype, *, quantized: bool, dropout: float):
    from kernels.lora import Projection

    w = torch.randn(n_out, n_in, dtype=dtype) / n_in**0.5
    return Projection(
        weight=lambda out, w=w: w if out is None else out.copy_(w),
        bias=None,
        scaling=2.0,
        dropout=dropout,
        compute_dtype=dtype,
        quantized=quantized,  # a 4-bit base rounds the LoRA term first (the weight stays dense here)
        out_features=n_out,
        in_features=n_in,
    )


def _lora_params(projections, rank: int) -> list:
    params = []
    for p in projections:
        a = (torch.randn(rank, p.in_features) * 0.1).requires_grad_()
        b = (torch.randn(p.out_features, rank) * 0.1).requires_grad_()
        params += [a, b, None]
    return params


def drive_lora() -> None:
    from kernels.lora import lora_linears, lora_mlp

    hidden, inter, rank = 32, 48, 8
    for dtype in FLOATS:
        for quantized, dropout in ((False, 0.0), (True, 0.1)):
            x = torch.randn(2, 9, hidden, dtype=dtype, requires_grad=True)
            qkv = [_dense_projection(n, hidden, dtype, quantized=quantized, dropout=dropout) for n in (32, 16, 16)]
            params = _lora_params(qkv, rank)
            _grad(lora_linears(x, qkv, *params), [x, *(t for t in params if t is not None)])
            gate, up = (_dense_projection(inter, hidden, dtype, quantized=quantized, dropout=dropout) for _ in "gu")
            down = _dense_projection(hidden, inter, dtype, quantized=quantized, dropout=dropout)
            params = _lora_params((gate, up, down), rank)
            _grad(lora_mlp(x, gate, up, down, *params), [x, *(t for t in params if t is not None)])
            # with the RMSNorm prologue: in bf16 the fold's input buffers (kernels/fold.py)
            norm = ((1 + 0.1 * torch.randn(hidden)).to(dtype), 1e-6)
            params = _lora_params(qkv, rank)
            _grad(lora_linears(x, qkv, *params, norm=norm), [x, *(t for t in params if t is not None)])


def drive_nf4() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from kernels.nf4 import Nf4Weight, dequantize, matmul_4bit

    def weight(shape, dtype, quant_type, blocksize, nested):
        w = (torch.randn(shape) * 0.05).to(dtype)
        packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        return Nf4Weight.from_quant_state(packed, qs)

    for dtype in FLOATS:
        for nested, blocksize in ((True, 64), (False, 128)):
            # an odd value count; whole tiles of 8192 values; neither
            for shape, quant_type in (((5, 7), "nf4"), ((64, 128), "nf4"), ((33, 320), "fp4")):
                dequantize(weight(shape, dtype, quant_type, blocksize, nested))
        wide = torch.empty(64, 128 + 32, dtype=dtype)  # the LoRA fold's row-strided out
        dequantize(weight((64, 128), dtype, "nf4", 64, True), out=wide[:, :128])
    # matmul_4bit compiles slowly (128 x 128 tiles): each dtype once, nested and not among them
    for dtype, nested, blocksize in (
        (torch.bfloat16, True, 64),
        (torch.float16, False, 128),
        (torch.float32, True, 256),
    ):
        w = weight((96, 256), dtype, "nf4", blocksize, nested)
        matmul_4bit(torch.randn(19, 256, dtype=dtype), w)  # x @ W^T
        matmul_4bit(torch.randn(19, 96, dtype=dtype), w, transpose=True)  # x @ W


def drive_linear_cross_entropy() -> None:
    from kernels.linear_cross_entropy import linear_cross_entropy

    options = ({}, {"logit_scale": 0.5}, {"softcap": 30.0}, {"logit_scale": 0.5, "softcap": 30.0})
    for dtype in FLOATS:
        for vocab in (300, 5000):  # 5000: more than one GPU tile of 4096
            x = torch.randn(20, 32, dtype=dtype, requires_grad=True)
            w = (torch.randn(vocab, 32) / 32**0.5).to(dtype).requires_grad_()
            labels = torch.randint(0, vocab, (20,))
            labels[::3] = -100
            for opts in options:
                _grad(linear_cross_entropy(x, w, labels, **opts), (x, w))


DRIVERS: dict[str, Callable[[], None]] = {
    "rmsnorm": drive_rmsnorm,
    "rope": drive_rope,
    "swiglu": drive_swiglu,
    "lowrank": drive_lowrank,
    "lora": drive_lora,
    "fold": drive_fold,
    "nf4": drive_nf4,
    "linear_cross_entropy": drive_linear_cross_entropy,
}
MODES = ("cpu_launch", "cuda_launch")


def record(group: str, mode: str) -> list[Launch]:
    """The distinct launches one op group makes, with CPU or CUDA launch choices."""
    import kernels.nf4 as nf4

    torch.manual_seed(0)
    with recording_launches() as launches, pytest.MonkeyPatch.context() as mp:
        # nf4's dequantize takes 2^17-value tiles in the interpreter (8192 on a GPU), in both
        # modes here: no GPU ever builds that tile, and it takes ~10 s a configuration to compile.
        mp.setattr(nf4, "_TILE", GPU_NF4_TILE)
        if mode == "cuda_launch":
            with cuda_launch_choices():
                DRIVERS[group]()
        else:
            DRIVERS[group]()
    return list({launch.key: launch for launch in launches}.values())


# ---------------------------------------------------------------------------------------------
# Compiling for sm_90, in fresh processes without the interpreter
# ---------------------------------------------------------------------------------------------
#
# Not in this process: under TRITON_INTERPRET=1 every @triton.jit function (ours, and
# triton.language's own, such as tl.zeros) is an interpreter object, and running kernels in the
# interpreter leaves parts of triton.language patched for it (seen with Triton 3.9), which the
# code generator then trips over. A worker started with TRITON_INTERPRET=0 imports the same
# kernel modules, where triton.jit gives real JITFunctions, and compiles each configuration.

_WORKER = r"""
import importlib, json, sys, traceback

import triton
import triton.language as tl


def probe(X, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), tl.full([BLOCK], 1.0, tl.float32))


def compile_one(fn, signature, constexprs, options, arch):
    source = ASTSource(fn, signature, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    if not kernel.asm.get("cubin"):
        raise RuntimeError("no cubin produced")


def error_text(exc):
    parts = []  # the error and what caused it: the innermost is the one inside a helper
    while exc is not None and len(parts) < 8:
        parts.append("".join(traceback.format_exception_only(type(exc), exc)).strip())
        exc = exc.__cause__ or exc.__context__
    return "\n  caused by: ".join(parts)


jobs_path, results_path, arch = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(jobs_path) as f:
    jobs = json.load(f)
with open(results_path, "w") as out:

    def report(**result):
        out.write(json.dumps(result) + "\n")
        out.flush()

    try:  # can this Triton build a cubin here at all (compiler API, CUDA backend, ptxas)?
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction

        probe = triton.jit(probe)
        if not isinstance(probe, JITFunction):
            raise RuntimeError(f"triton.jit gave a {type(probe).__name__} (is TRITON_INTERPRET set?)")
        compile_one(probe, {"X": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 128}, {}, arch)
    except Exception as exc:
        report(probe=error_text(exc))
        sys.exit(0)
    report(probe=None)
    for job in jobs:
        try:
            fn = getattr(importlib.import_module(job["module"]), job["name"])
            if not isinstance(fn, JITFunction):
                raise TypeError(f"{job['module']}.{job['name']} is a {type(fn).__name__}, not a JITFunction")
            constexprs = {k: tl.dtype(v["tl.dtype"]) if isinstance(v, dict) else v for k, v in job["constexprs"].items()}
            compile_one(fn, job["signature"], constexprs, job["options"], arch)
            report(id=job["id"], error=None)
        except Exception as exc:
            report(id=job["id"], error=error_text(exc))
"""
_WORKER_TIMEOUT_S = 900
REPO_ROOT = Path(__file__).resolve().parent.parent


def _encode(name: str, value):
    if isinstance(value, tl.dtype):
        return {"tl.dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"constexpr {name}={value!r}: cannot pass a {type(value).__name__} to the compile worker")


def _job(index: int, launch: Launch) -> dict:
    fn = launch.kernel.fn
    return {
        "id": index,
        "module": fn.__module__,
        "name": fn.__name__,
        "signature": dict(launch.signature),
        "constexprs": {k: _encode(k, v) for k, v in launch.constexprs},
        "options": dict(launch.options),
    }


def compile_for_sm90(launches: list[Launch], workdir: Path) -> tuple[str | None, dict[tuple, str | None]]:
    """(why nothing can be compiled here or None, {launch key: None if it compiled, else the
    error}), compiled by a few worker processes side by side."""
    jobs = [_job(i, launch) for i, launch in enumerate(launches)]
    workers = max(1, min(len(jobs), os.cpu_count() or 1, 4))
    script = workdir / "compile_worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    procs = []
    for w in range(workers):
        jobs_path, results_path = workdir / f"jobs{w}.json", workdir / f"results{w}.jsonl"
        stderr_path = workdir / f"stderr{w}.txt"
        jobs_path.write_text(json.dumps(jobs[w::workers]))
        cmd = [sys.executable, str(script), str(jobs_path), str(results_path), str(TARGET_ARCH)]
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        procs.append((proc, results_path, stderr_path, jobs[w::workers]))
    results: dict[int, str | None] = {}
    probe_errors, dead = [], []
    deadline = time.monotonic() + _WORKER_TIMEOUT_S
    for proc, results_path, stderr_path, assigned in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            died = f"the compile worker exited with {proc.returncode}" if proc.returncode else None
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            died = f"the compile worker ran past {_WORKER_TIMEOUT_S} s"
        lines = results_path.read_text().splitlines() if results_path.exists() else []
        for line in map(json.loads, lines):
            if "probe" in line:
                if line["probe"] is not None:
                    probe_errors.append(line["probe"])
            else:
                results[line["id"]] = line["error"]
        tail = stderr_path.read_text(errors="replace")[-2000:]
        for job in assigned:
            if job["id"] not in results and not probe_errors:
                results[job["id"]] = f"{died or 'the compile worker stopped'} before reporting this one:\n{tail}"
        if not lines:
            dead.append(f"{died or 'the compile worker reported nothing'}:\n{tail}")
    if dead:
        pytest.fail("\n\n".join(dead))
    if probe_errors:
        return probe_errors[0], {}
    return None, {launch.key: results[i] for i, launch in enumerate(launches)}


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """Every group's launches recorded, and every distinct one compiled for sm_90; skips unless
    the kernels run in the interpreter and this Triton can build sm_90 cubins here."""
    if not kernels.runtime.INTERPRET:
        pytest.skip("TRITON_INTERPRET is not 1: the ops launch no Triton kernels on CPU tensors")
    try:
        from triton.backends import backends
    except ImportError as exc:
        pytest.skip(f"this Triton has no GPU backends: {exc}")
    if "nvidia" not in backends:
        pytest.skip(f"this Triton has no CUDA backend (backends: {sorted(backends)})")
    recorded: dict[tuple[str, str], list[Launch] | BaseException] = {}
    for group in DRIVERS:
        for mode in MODES:
            try:
                recorded[group, mode] = record(group, mode)
            except (Exception, pytest.skip.Exception) as exc:  # raised again by the group's test
                recorded[group, mode] = exc
    unique = {launch.key: launch for value in recorded.values() if isinstance(value, list) for launch in value}
    why_not, errors = compile_for_sm90(list(unique.values()), tmp_path_factory.mktemp("sm90"))
    if why_not is not None:
        pytest.skip(f"this Triton cannot build an sm_{TARGET_ARCH} cubin here: {why_not}")
    return recorded, errors


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group", list(DRIVERS))
def test_kernels_compile_for_sm90(sm90, group, mode):
    recorded, errors = sm90
    launches = recorded[group, mode]
    if isinstance(launches, BaseException):
        raise launches
    assert launches, f"{group}: no Triton kernel was launched"
    failures = [(launch, errors[launch.key]) for launch in launches if errors[launch.key] is not None]
    if failures:
        report = "\n\n".join(f"{launch.label}\n{error}" for launch, error in failures)
        pytest.fail(f"{len(failures)} of {len(launches)} kernel configurations fail to compile for sm_90:\n\n{report}")


def _kernels_defined() -> set[str]:
    """Our @triton.jit functions that are launched (not called from another jit function)."""
    import kernels.fold
    import kernels.linear_cross_entropy
    import kernels.lora
    import kernels.lowrank
    import kernels.nf4
    import kernels.rmsnorm
    import kernels.rope
    import kernels.swiglu  # noqa: F401

    interpreted = _interpreted_function_class()
    functions = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("kernels."):
            for value in vars(module).values():
                if isinstance(value, interpreted) and value.fn.__module__ == name:
                    functions[f"{name}.{value.fn.__name__}"] = value.fn
    sources = {key: inspect.getsource(fn) for key, fn in functions.items()}
    helpers = {
        key
        for key, fn in functions.items()
        if any(re.search(rf"\b{fn.__name__}\s*\(", src) for other, src in sources.items() if other != key)
    }
    return set(functions) - helpers


def test_every_kernel_is_launched(sm90):
    """A kernel that no driver above launches would be compiled by no test here."""
    recorded, _ = sm90
    launched = {
        f"{launch.kernel.fn.__module__}.{launch.kernel.fn.__name__}"
        for launches in recorded.values()
        if isinstance(launches, list)
        for launch in launches
    }
    missing = _kernels_defined() - launched
    assert not missing, f"kernels that no driver in tests/test_gpu_compile.py launches: {sorted(missing)}"
