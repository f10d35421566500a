"""LoRA fine-tuning through graft: prints the rewrite report, a progress bar and the loss.

    python examples/finetune.py                        # embedded tiny Llama, offline, CPU or GPU
    python examples/finetune.py --model PATH [--4bit]  # a checkpoint on disk (GPU recommended)

The default is self-contained: a small Llama config and the text below, tokenized as bytes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from rewriter import optimize, report  # noqa: E402

CORPUS = """\
A compiler reads a program, finds the shapes it knows how to improve, and rewrites them.
graft reads a language model the same way. It captures the forward pass as a graph, finds
the normalisations, the rotary embeddings, the gated activations and the low-rank adapters,
and replaces each with a fused kernel whose backward pass was derived by hand. Then it checks
every replacement against a float64 run of the code it replaced, and keeps only what passes.
The model still trains with the usual tools, saves with the usual calls, and generates text
as before; it only needs less memory and less time to do so.
"""

TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def load(args: argparse.Namespace, device: torch.device):
    if args.model is None:
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(device, dtype)
        tokens = torch.tensor(list(CORPUS.encode("utf-8")))
        return model, tokens
    quantization = None
    if args.four_bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, quantization_config=quantization, device_map={"": device}
    )
    tokens = AutoTokenizer.from_pretrained(args.model)(CORPUS, return_tensors="pt")["input_ids"][0]
    return model, tokens


def batches(tokens: torch.Tensor, seq_len: int, batch_size: int, steps: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    seq_len = min(seq_len, len(tokens) - 1)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=gen)
        ids = torch.stack([tokens[s : s + seq_len] for s in starts]).to(device)
        yield {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="path of a Hugging Face causal LM (default: embedded tiny Llama)")
    parser.add_argument("--4bit", dest="four_bit", action="store_true", help="load the model in bitsandbytes NF4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--json", help="also write the rewrite report as JSON to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokens = load(args, device)
    lora = LoraConfig(
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    data = list(batches(tokens, args.seq_len, args.batch_size, args.steps, device))
    model = optimize(model, sample=data[0])  # capture and verify on a real batch: no recompile later
    print(report(model))
    if args.json:
        Path(args.json).write_text(report(model).to_json())

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    progress = tqdm(data, desc="train")
    for step, batch in enumerate(progress):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        tqdm.write(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
