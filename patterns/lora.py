"""LoRA patterns: PEFT LoRA layers over nn.Linear or bitsandbytes Linear4bit as fused nodes.

These are module patterns (rewriter/module_match.py): the captured form of a 4-bit projection
varies (bnb's gemm_4bit, gemv_4bit, or MatMul4Bit traced as autograd_function_apply), so a
match is every node of the module group, and the replacement is built from the PEFT modules
themselves. The float64 judge of the verifier runs those very nodes, with the bnb ops lowered
below (dequantize in fp32, then the matmul in fp64).

Supported beyond the usual: lora_dropout > 0 (the mask is replayed exactly in backward), a
base-layer bias, use_rslora (the module's scaling is read as is), fp32 or half LoRA weights.
Refused with the reason in the report: several active adapters, DoRA and other variants, merged
or disabled adapters, LoRA's own bias, fan_in_fan_out layers, other base layer types.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from kernels.lora import Projection, lora_linears, lora_mlp
from kernels.nf4 import Nf4Weight, dequantize
from kernels.nf4 import unsupported_reason as nf4_unsupported
from rewriter.module_match import ModuleBinding, ModuleGroup, ModulePattern
from rewriter.registry import register_pattern
from rewriter.verify import FLOAT64_LOWERINGS

try:
    import bitsandbytes as bnb
except ImportError:  # bnb is optional at run time: dense LoRA still works
    bnb = None

try:
    from peft.tuners.lora.layer import LoraLayer
except ImportError:
    LoraLayer = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -- what a LoRA layer is, and whether we can fuse it ------------------------------------------


def is_lora_layer(module: torch.nn.Module) -> bool:
    return LoraLayer is not None and isinstance(module, LoraLayer)


def _is_4bit(base: torch.nn.Module) -> bool:
    return bnb is not None and isinstance(base, bnb.nn.Linear4bit)


def lora_problem(module: torch.nn.Module) -> str | None:
    """Why this LoRA layer cannot be fused (None if it can)."""
    adapters = list(module.active_adapters)
    if module.disable_adapters:
        return "adapters are disabled"
    if module.merged:
        return "adapters are merged into the base weight"
    if len(adapters) != 1:
        return f"{len(adapters)} active adapters (one is supported)"
    (name,) = adapters
    if name not in module.lora_A:
        return f"active adapter {name!r} has no LoRA weights here"
    if name in getattr(module, "lora_variant", {}):
        return f"{type(module.lora_variant[name]).__name__} (e.g. DoRA) is not supported"
    if getattr(module, "lora_bias", {}).get(name):
        return "LoRA's own bias (lora_bias=True) is not supported"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out layers are not supported"
    base = module.get_base_layer()
    if _is_4bit(base):
        # FSDP (both versions mark the modules they manage) swaps the packed weight for shards
        # and gathered copies each step; the quant_state stays behind on the module, and a
        # node built on one copy would read another step's freed bytes
        if getattr(base, "_is_fsdp_managed_module", False):
            return "4-bit weight sharded by FSDP (its quant_state does not follow the shards); bitsandbytes keeps this layer"
        state = getattr(base.weight, "quant_state", None)
        if not isinstance(base.weight, bnb.nn.Params4bit) or state is None:
            return f"4-bit base weight is a {type(base.weight).__name__} without its quant_state"
        if getattr(state, "packing_format_for_cpu", False):
            return "weight is repacked for bnb's CPU inference kernel"
        why = nf4_unsupported(base.weight.data, state)
        if why:
            return why
    elif type(base) is not torch.nn.Linear:
        return f"base layer {type(base).__name__} is not nn.Linear or bitsandbytes Linear4bit"
    dtypes = {module.lora_A[name].weight.dtype, module.lora_B[name].weight.dtype}
    if len(dtypes) != 1 or not dtypes <= set(SUPPORTED_DTYPES):
        return f"LoRA weight dtypes {sorted(map(str, dtypes))} are not supported"
    return None


def _dequantizer(weight, compute: torch.dtype):
    """out <- the 4-bit weight, dense in the compute dtype (bitsandbytes' values, bit for bit)."""

    built: dict[str, object] = {}

    def dense(out: torch.Tensor | None) -> torch.Tensor:
        # Nf4Weight holds references only; rebuilt (and re-checked) when the module's weight or
        # its quant_state is replaced, e.g. moved to another device. Holding the state keeps
        # its identity from being reused.
        state, ptr = weight.quant_state, weight.data_ptr()
        if built.get("state") is not state or built.get("ptr") != ptr:
            built.update(state=state, ptr=ptr, packed=Nf4Weight.from_param(weight))
        packed = built["packed"]
        if packed.dtype == compute:
            return dequantize(packed, out)
        values = dequantize(packed).to(compute)
        return values if out is None else out.copy_(values)

    return dense


def _dense(weight: torch.Tensor):
    return lambda out: weight if out is None else out.copy_(weight)


def projection(module: torch.nn.Module, x_dtype: torch.dtype) -> Projection:
    (name,) = module.active_adapters
    base = module.get_base_layer()
    dropout = module.lora_dropout[name]
    if _is_4bit(base):
        compute = base.compute_dtype or x_dtype
        dense = _dequantizer(base.weight, compute)
    else:
        compute = base.weight.dtype
        dense = _dense(base.weight)
    return Projection(
        weight=dense,
        bias=None,
        scaling=float(module.scaling[name]),
        dropout=float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0,
        compute_dtype=compute,
        quantized=_is_4bit(base),
        out_features=base.out_features,
        in_features=base.in_features,
    )


def _params(group: ModuleGroup, module: torch.nn.Module) -> list | str:
    """The graph nodes of A, B and the base bias of a layer, in that order."""
    (name,) = module.active_adapters
    A, B = module.lora_A[name].weight, module.lora_B[name].weight
    bias = module.get_base_layer().bias
    nodes = [group.node_for(A), group.node_for(B), group.node_for(bias)]
    if nodes[0] is None or nodes[1] is None:
        return "LoRA weights are not inputs of the captured graph"
    if bias is not None and nodes[2] is None:
        return "the base bias is not an input of the captured graph"
    return nodes


def _activation(group: ModuleGroup) -> torch.fx.Node | str:
    acts = group.activations()
    if len(acts) != 1:
        return f"expected one input activation, found {len(acts)}"
    x = acts[0].meta["example_value"]
    if x.dtype not in SUPPORTED_DTYPES:
        return f"unsupported input dtype {x.dtype}"
    if x.device.type not in ("cuda", "cpu"):
        return f"unsupported device {x.device}"
    return acts[0]


# -- binding a group to a fused node ------------------------------------------------------------


def _fusable(group: ModuleGroup, layers: list[torch.nn.Module]):
    """(x, projections, the (A, B, bias) nodes of every layer), or why the layers cannot be one
    fused node."""
    for layer in layers:
        why = lora_problem(layer)
        if why:
            return why
    x = _activation(group)
    if isinstance(x, str):
        return x
    projections = tuple(projection(m, x.meta["example_value"].dtype) for m in layers)
    if len({(p.compute_dtype, p.quantized) for p in projections}) != 1:
        return "the projections differ in compute dtype or quantization"
    params = []
    for layer in layers:
        nodes = _params(group, layer)
        if isinstance(nodes, str):
            return nodes
        params += nodes
    return x, projections, params


def _rmsnorm_problem(norm: torch.nn.Module) -> str | None:
    """Why this module is not HF Llama's RMSNorm as kernels/rmsnorm.py computes it (the float64
    check of each match is what proves it; this only refuses the known different ones)."""
    cls = type(norm).__name__
    if not cls.endswith("RMSNorm") or cls.startswith("Gemma"):
        return f"{cls} is not a Llama-style RMSNorm"
    if not isinstance(getattr(norm, "weight", None), torch.Tensor) or not hasattr(norm, "variance_epsilon"):
        return f"{cls} has no weight or variance_epsilon"
    return None


def _prologue(group: ModuleGroup, with_norm: bool):
    """(the norm weight's node or None, its eps, the LoRA modules and their paths): with_norm,
    the group's first module is the RMSNorm whose output the rest reads."""
    if not with_norm:
        return None, 0.0, group.modules, group.paths
    norm = group.modules[0]
    why = _rmsnorm_problem(norm)
    if why:
        return why
    weight = group.node_for(norm.weight)
    if weight is None:
        return "the norm weight is not an input of the captured graph"
    return weight, float(norm.variance_epsilon), group.modules[1:], group.paths[1:]


def _norm_arg(weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, float] | None:
    return None if weight is None else (weight, eps)


def bind_projections(group: ModuleGroup, with_norm: bool = False) -> ModuleBinding | str:
    """Projections sharing one input (one LoRA layer, or q, k and v), optionally after the
    RMSNorm that feeds them."""
    prologue = _prologue(group, with_norm)
    if isinstance(prologue, str):
        return prologue
    weight, eps, layers, paths = prologue
    fusable = _fusable(group, layers)
    if isinstance(fusable, str):
        return fusable
    x, projections, params = fusable
    outputs = []
    for path in paths:
        out = group.outputs_of(path)
        if len(out) != 1:
            return f"{path} has {len(out)} outputs, expected one"
        outputs += out
    if len(outputs) != len(group.outputs):
        return "a value other than the projections' outputs leaves the group (the norm's output?)"

    def lora_shared_input(x, norm_weight, *params):
        out = lora_linears(x, projections, *params, norm=_norm_arg(norm_weight, eps))
        return out[0] if len(projections) == 1 else out

    return ModuleBinding([x, weight, *params], outputs, lora_shared_input)


def bind_mlp(group: ModuleGroup, with_norm: bool = False) -> ModuleBinding | str:
    """gate, up, SwiGLU and down with LoRA, optionally after the RMSNorm that feeds them."""
    prologue = _prologue(group, with_norm)
    if isinstance(prologue, str):
        return prologue
    weight, eps, (mlp,), _ = prologue
    fusable = _fusable(group, [mlp.gate_proj, mlp.up_proj, mlp.down_proj])
    if isinstance(fusable, str):
        return fusable
    x, (gate, up, down), params = fusable
    if len(group.outputs) != 1:
        return f"the group has {len(group.outputs)} outputs, expected the MLP's one"

    def lora_swiglu_mlp(x, norm_weight, *params):
        return lora_mlp(x, gate, up, down, *params, norm=_norm_arg(norm_weight, eps))

    def recomputed(x, norm_weight, *params):  # what a checkpoint's recompute needs (rewriter/checkpoint.py)
        return lora_mlp(x, gate, up, down, *params, norm=_norm_arg(norm_weight, eps), need_output=False)

    lora_swiglu_mlp.recompute_without_output = recomputed
    return ModuleBinding([x, weight, *params], group.outputs, lora_swiglu_mlp)


def bind_norm_projections(group: ModuleGroup) -> ModuleBinding | str:
    return bind_projections(group, with_norm=True)


def bind_norm_mlp(group: ModuleGroup) -> ModuleBinding | str:
    return bind_mlp(group, with_norm=True)


# -- which modules form a group -----------------------------------------------------------------


def _children(module: torch.nn.Module, names: list[str]) -> list[torch.nn.Module] | None:
    children = [getattr(module, n, None) for n in names]
    return children if all(c is not None and is_lora_layer(c) for c in children) else None


def select_mlp(path: str, module: torch.nn.Module, modules: Mapping[str, torch.nn.Module]) -> list[str] | None:
    if _children(module, ["gate_proj", "up_proj", "down_proj"]) is None:
        return None
    act = getattr(module, "act_fn", None)
    return [path] if isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation") else None


def select_qkv(path: str, module: torch.nn.Module, modules: Mapping[str, torch.nn.Module]) -> list[str] | None:
    if _children(module, ["q_proj", "k_proj", "v_proj"]) is None:
        return None
    return [f"{path}.{n}" if path else n for n in ("q_proj", "k_proj", "v_proj")]


def select_o(path: str, module: torch.nn.Module, modules: Mapping[str, torch.nn.Module]) -> list[str] | None:
    return [path] if path.endswith("o_proj") and is_lora_layer(module) else None


def select_any(path: str, module: torch.nn.Module, modules: Mapping[str, torch.nn.Module]) -> list[str] | None:
    return [path] if is_lora_layer(module) else None


def _under(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _norm_then(norm: str, child: str, select_child: Callable) -> Callable:
    """A selector for a decoder layer's `norm` together with the group `select_child` finds in
    its `child` module (the group that reads the norm's output)."""

    def select(path: str, module: torch.nn.Module, modules: Mapping[str, torch.nn.Module]) -> list[str] | None:
        inner_module = getattr(module, child, None)
        if getattr(module, norm, None) is None or inner_module is None:
            return None
        inner = select_child(_under(path, child), inner_module, modules)
        return [_under(path, norm), *inner] if inner else None

    return select


select_norm_qkv = _norm_then("input_layernorm", "self_attn", select_qkv)  # the norm with q, k and v
select_norm_mlp = _norm_then("post_attention_layernorm", "mlp", select_mlp)  # the norm with the MLP


RMSNORM_LORA_MLP = register_pattern(ModulePattern("rmsnorm_lora_mlp", select_norm_mlp, bind_norm_mlp))
RMSNORM_LORA_QKV = register_pattern(ModulePattern("rmsnorm_lora_qkv", select_norm_qkv, bind_norm_projections))
LORA_MLP = register_pattern(ModulePattern("lora_mlp", select_mlp, bind_mlp))
LORA_QKV = register_pattern(ModulePattern("lora_qkv", select_qkv, bind_projections))
LORA_O = register_pattern(ModulePattern("lora_o", select_o, bind_projections))
LORA_LINEAR = register_pattern(ModulePattern("lora_linear", select_any, bind_projections))


# -- the float64 judge for bitsandbytes ops -----------------------------------------------------
# Dequantize in fp32 (the exact products code * absmax), then compute in fp64. The model uses
# the same products rounded to the compute dtype: that rounding is part of eager's error and of
# ours alike.


def _absmax(absmax, absmax_8bit=None, absmax_code=None, absmax_offset=None) -> torch.Tensor:
    absmax = absmax.float()
    if absmax_8bit is None:
        return absmax
    ops = torch.ops.bitsandbytes
    nested = ops.dequantize_blockwise.default(absmax_8bit, absmax, absmax_code.float(), 256, torch.float32)
    return nested + absmax_offset.float()


def _gemm_4bit_f64(A, B, shapeB, absmax, blocksize, quant_type, bias=None, **nested):
    absmax = _absmax(absmax, **nested)
    weight = torch.ops.bitsandbytes.dequantize_4bit.default(B, absmax, blocksize, quant_type, shapeB, torch.float32)
    return F.linear(A, weight.double(), bias)


def _gemv_4bit_f64(A, B, shapeB, absmax, code, blocksize):
    quant_type = "nf4" if torch.equal(code.float(), bnb.functional.get_4bit_type("nf4", device=code.device)) else "fp4"
    return _gemm_4bit_f64(A, B, shapeB, absmax, blocksize, quant_type)


def _dequantize_4bit_f64(A, absmax, blocksize, quant_type, shape, dtype):
    ops = torch.ops.bitsandbytes
    return ops.dequantize_4bit.default(A, absmax.float(), blocksize, quant_type, shape, torch.float32).double()


def _dequantize_blockwise_f64(A, absmax, code, blocksize, dtype):
    ops = torch.ops.bitsandbytes
    return ops.dequantize_blockwise.default(A, absmax.float(), code.float(), blocksize, torch.float32).double()


if bnb is not None:
    _ops = torch.ops.bitsandbytes
    for _name, _lowering in {
        "gemm_4bit": _gemm_4bit_f64,
        "gemv_4bit": _gemv_4bit_f64,
        "dequantize_4bit": _dequantize_4bit_f64,
        "dequantize_blockwise": _dequantize_blockwise_f64,
    }.items():
        if hasattr(_ops, _name):
            FLOAT64_LOWERINGS[getattr(_ops, _name).default] = _lowering
