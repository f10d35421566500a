"""Does the memory layout of q, k, v change SDPA's speed? (Llama-8B attention, bf16, causal, GQA.)

The 8B profile (2026-11-29) showed cuDNN's flash attention 2.6-3x slower inside graft's graph
than in HF eager: same kernels, different inputs. graft's lora_qkv writes q, k and v as column
blocks of one (tokens, 6144) buffer and its RoPE writes fresh (B, H, S, D)-contiguous q and k;
HF keeps each projection in its own buffer, viewed as (B, S, H, D) and transposed. This times
forward + backward of F.scaled_dot_product_attention for each layout.

    python benchmarks/bench_attention_layout.py
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

H, KV, D = 32, 8, 128


def layouts(b: int, s: int, device: str, dtype: torch.dtype) -> dict:
    m = b * s

    def bshd(t: torch.Tensor, heads: int) -> torch.Tensor:  # (M, heads*D) -> (B, heads, S, D) view
        return t.view(b, s, heads, D).transpose(1, 2)

    def fresh(n: int) -> torch.Tensor:
        return torch.randn(m, n, device=device, dtype=dtype)

    stacked = fresh((H + 2 * KV) * D)
    q_s, k_s, v_s = stacked.split([H * D, KV * D, KV * D], dim=1)
    return {
        "hf (separate buffers, BSHD views)": (bshd(fresh(H * D), H), bshd(fresh(KV * D), KV), bshd(fresh(KV * D), KV)),
        "graft (q,k BHSD; v a column block)": (
            bshd(q_s, H).contiguous(),
            bshd(k_s, KV).contiguous(),
            bshd(v_s, KV),
        ),
        "q,k BHSD; v own buffer": (bshd(q_s, H).contiguous(), bshd(k_s, KV).contiguous(), bshd(fresh(KV * D), KV)),
        "all column blocks": (bshd(q_s, H), bshd(k_s, KV), bshd(v_s, KV)),
        "all BHSD contiguous": tuple(bshd(t, n).contiguous() for t, n in ((q_s, H), (k_s, KV), (v_s, KV))),
    }


def time_ms(q, k, v, repeats: int) -> float:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad = torch.randn_like(out)
    times = []
    for i in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(grad)
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"{'batch x seq':<12} {'layout':<38} {'fwd+bwd ms':>10}  grad layouts (dq, dk, dv strides)")
    for b, s in ((2, 2048), (1, 16384)):
        for name, (q, k, v) in layouts(b, s, "cuda", torch.bfloat16).items():
            ms = time_ms(q, k, v, args.repeats)
            print(f"{b} x {s:<8} {name:<38} {ms:>10.2f}  q{tuple(q.stride())} v{tuple(v.stride())}", flush=True)


if __name__ == "__main__":
    main()
