"""Tiny real transformers/peft models built in the test process: random weights, no downloads."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 160
LAYERS = 2


def tiny_config(model_type: str, **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,  # a multiple of bnb's 4-bit block size (its CPU dequantize needs it)
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if model_type == "llama":
        return LlamaConfig(**{"rms_norm_eps": 1e-5, **common})
    if model_type == "mistral":
        return MistralConfig(**{"rms_norm_eps": 1e-6, "sliding_window": None, "rope_theta": 1e6, **common})
    if model_type == "qwen2":  # Llama's layer with q/k/v biases
        return Qwen2Config(**{"rms_norm_eps": 1e-6, "rope_theta": 1e6, **common})
    raise ValueError(model_type)


def tiny_causal_lm(
    model_type: str, *, dtype=torch.float32, lora: bool = True, seed: int = 0, config: dict | None = None, **lora_kwargs
):
    torch.manual_seed(seed)
    if model_type == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4))
    else:
        classes = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}
        model = classes[model_type](tiny_config(model_type, **(config or {})))
    model = model.to(dtype)
    if lora:
        config = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
        config.update(lora_kwargs)
        model = get_peft_model(model, LoraConfig(**config))
    return model


def batch(seed: int, length: int = 19, size: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (size, length), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def train_losses(model, steps: int = 5, lr: float = 1e-3, batches=None) -> list[float]:
    """AdamW on fresh random batches of varying length (or batches(step)); each step's loss."""
    model.train()
    torch.manual_seed(1234)  # the same dropout masks for a model and its twin
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        b = batches(step) if batches is not None else batch(100 + step, length=13 + 6 * step)
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def tiny_4bit_causal_lm(
    model_type: str,
    tmp_path,
    *,
    double_quant: bool = True,
    quant_type: str = "nf4",
    config: dict | None = None,
    **lora_kwargs,
):
    """The tiny model saved in bf16 and loaded back through BitsAndBytesConfig (4-bit, CPU), with LoRA."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = tmp_path / f"{model_type}-{'-'.join(f'{k}={v}' for k, v in sorted((config or {}).items()))}-bf16"
    if not path.exists():
        tiny_causal_lm(model_type, lora=False, dtype=torch.bfloat16, config=config).save_pretrained(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16)
    torch.manual_seed(1)
    config = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    config.update(lora_kwargs)
    return get_peft_model(model, LoraConfig(**config))


def norms_covered(rep) -> int:
    """RMSNorms replaced, alone or as the prologue of a fused LoRA node."""
    counts = rep.counts()
    return sum(counts.get(name, 0) for name in ("rmsnorm", "rmsnorm_lora_qkv", "rmsnorm_lora_mlp"))
