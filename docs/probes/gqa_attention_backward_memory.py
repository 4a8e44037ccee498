"""What one grouped-query attention backward allocates on a GPU, against the planner's level-1 events (issue 18).

Why: the planner counts dq, its fp32 accumulator, dk and dv during the attention backward, and, with fewer key/value
heads than query heads in half precision, FlashAttention's dk and dv for every query head (`planner.schedule.
gqa_expanded_bytes_per_token`, from PyTorch's `mha_bwd`). Newer PyTorch may prefer cuDNN's attention on Hopper,
whose backward allocates otherwise; this prints which backend SDPA picks for the Llama-3-8B shape and the bytes
its backward allocates above what exists before it (the saved q, k, v, output, log-sum-exp and the incoming
gradient), beside the planner's count.

    python3 docs/probes/gqa_attention_backward_memory.py --seq-lens 65536,131072
"""

import argparse

import torch
import torch.nn.functional as F

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="65536,131072")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    names = {int(b.value): name for name, b in torch.nn.attention.SDPBackend.__members__.items()}
    for seq in (int(s) for s in args.seq_lens.split(",")):
        # [B, S, H, D] leaves seen as [B, H, S, D], as the model's projections are: the gradients land as they are
        leaves = [torch.randn(1, seq, heads, args.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for heads in (args.heads, args.kv_heads, args.kv_heads)]
        q, k, v = (leaf.transpose(1, 2) for leaf in leaves)
        backend = torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=True)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        grad = torch.randn_like(out)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out.backward(grad)
        torch.cuda.synchronize()
        allocated = torch.cuda.max_memory_allocated() - before
        q_bytes, kv_bytes = q.numel() * 2, k.numel() * 2
        planned = q_bytes + 2 * q_bytes + 2 * kv_bytes  # dq, its fp32 accumulator, dk, dv
        expanded = 2 * q_bytes if args.kv_heads < args.heads else 0  # FlashAttention's per-query-head dk, dv
        print(f"seq {seq}: SDPA backend {names[backend]}; backward allocated "
              f"{allocated / GIB:.3f} GiB above its inputs; planner {(planned + expanded) / GIB:.3f} GiB "
              f"(dq + fp32 accumulator + dk + dv {planned / GIB:.3f}, per-query-head dk, dv {expanded / GIB:.3f})",
              flush=True)
        del leaves, q, k, v, out, grad
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
