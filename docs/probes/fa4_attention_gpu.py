"""Probe: FlashAttention-4 (the CuTe-DSL build, `flash_attn.cute`, Hopper and Blackwell kernels) against cuDNN's
causal attention, for causal sequences and for packed documents (issues 17 and 19).

Why: on an H200, cuDNN's causal attention (PyTorch's SDPA default there) runs ~490-516 TFLOP/s forward+backward and
the layer's matmuls ~790, so attention caps store-all MFU near 55%; and packed documents through FlexAttention run
at 0.73x cuDNN (mean document 16K) because FlexAttention's Triton backward is slower, while one cuDNN call per
document pays ~1.7 ms each. FA4's varlen kernel takes every document of a sequence in one call (cumulative lengths,
GQA without repeating heads, no per-length compilation), and PyTorch's FlexAttention can run on FA4 (its FLASH
backend) where it is installed.

Rows, forward + backward at --seq-len tokens, Llama-3-8B heads (32 query, 8 key/value, head dim 128), bf16, median of
--repeats after a warm-up (which includes FA4's just-in-time compilation, timed apart):
  causal_cudnn        SDPA is_causal (cuDNN), q/k/v [B, S, H, D] seen as [B, H, S, D] as the model makes them
  causal_fa4          flash_attn_func(causal=True) on the same [B, S, H, D] tensors
  documents_<mean>_fa4     flash_attn_varlen_func over the documents (log-normal lengths of that mean), on the
                      FLOPs the documents need
  documents_<mean>_flex    longtrain's FlexAttention path (Triton), same documents, for the ratio
  documents_<mean>_flex_fa4  FlexAttention with kernel_options BACKEND=FLASH, same block mask
TFLOP/s count model FLOPs (causal halved; documents: the sum over documents).

Needs flash-attn-4 and its CuTe-DSL wheels (nvidia-cutlass-dsl with libs-base, libs-core, libs-cu13; quack-kernels,
apache-tvm-ffi, torch-c-dlpack-ext) importable. Run from the repository root on the GPU machine (about 3 minutes):

    python3 docs/probes/fa4_attention_gpu.py --out profiles/runs

It writes profiles/runs/<gpu>_<date>_fa4_attention.{json,md}.
"""

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from document_masking_gpu import LLAMA3_8B, document_lengths, timed  # noqa: E402
from orchestrator.attention import DocumentLayout, document_attention  # noqa: E402
from spec.config import ModelConfig  # noqa: E402
from spec.flops import attention_training_flops  # noqa: E402


def laid_out(seq: int, heads: int, dim: int, grad: bool = True) -> torch.Tensor:
    """[1, S, H, D] storage (as the model's projections make it)."""
    return torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)


def row(rows: dict, name: str, step, flops: float, repeats: int) -> None:
    try:
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - started
        seconds = timed(step, repeats)
        rows[name] = {"seconds": seconds, "first_call_seconds": first, "tflops": flops / seconds / 1e12}
        print(f"{name}: {seconds * 1e3:.1f} ms, {flops / seconds / 1e12:.0f} TFLOP/s (first call {first:.2f} s)",
              flush=True)
    except Exception as error:  # noqa: BLE001 - a row that cannot run says why, the others go on
        rows[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        print(f"{name}: {rows[name]['error']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--means", default="16384,2048", help="mean document lengths of the documents rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="profiles/runs")
    args = parser.parse_args()
    seq = args.seq_len
    model = ModelConfig(**{**LLAMA3_8B, "num_layers": 1})
    heads, kv_heads, dim = model.num_heads, model.num_kv_heads, model.head_dim
    q, k, v = laid_out(seq, heads, dim), laid_out(seq, kv_heads, dim), laid_out(seq, kv_heads, dim)
    grad = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16)
    rows: dict = {}

    def backward_of(attend, inputs=(q, k, v), out_grad=grad):
        return lambda: torch.autograd.grad(attend(), inputs, out_grad)

    causal = attention_training_flops(model, seq * seq)
    seen = [t.transpose(1, 2) for t in (q, k, v)]  # [1, H, S, D] views
    row(rows, "causal_cudnn", backward_of(
        lambda: F.scaled_dot_product_attention(*seen, is_causal=True, enable_gqa=True),
        out_grad=grad.transpose(1, 2)), causal, args.repeats)
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except Exception as error:  # noqa: BLE001
        flash_attn_func = flash_attn_varlen_func = None
        rows["fa4_import"] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        print(f"flash_attn.cute: {rows['fa4_import']['error']}", flush=True)
    if flash_attn_func is not None:
        row(rows, "causal_fa4", backward_of(lambda: _first(flash_attn_func(q, k, v, causal=True))), causal,
            args.repeats)
    flat = [t.view(seq, t.shape[2], dim) for t in (q, k, v)]
    for mean in (int(m) for m in args.means.split(",")):
        lengths = document_lengths(seq, mean, 0)
        layout = DocumentLayout([lengths], [0], kernel="flex")
        flops = attention_training_flops(model, layout.sum_squared_lengths())
        if flash_attn_varlen_func is not None:
            cu = torch.tensor(np.cumsum([0] + lengths), device="cuda", dtype=torch.int32)
            row(rows, f"documents_{mean}_fa4", backward_of(
                lambda: _first(flash_attn_varlen_func(*flat, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                      max_seqlen_q=max(lengths), max_seqlen_k=max(lengths),
                                                      causal=True)), out_grad=grad.view(seq, heads, dim)),
                flops, args.repeats)
        row(rows, f"documents_{mean}_flex", backward_of(lambda: document_attention(*seen, layout),
                                                        out_grad=grad.transpose(1, 2)), flops, args.repeats)
        from torch.nn.attention.flex_attention import flex_attention

        flash_flex = torch.compile(flex_attention, dynamic=False)
        row(rows, f"documents_{mean}_flex_fa4", backward_of(
            lambda: flash_flex(*seen, block_mask=layout.block_mask("cuda"), enable_gqa=True,
                               kernel_options={"BACKEND": "FLASH"}), out_grad=grad.transpose(1, 2)),
            flops, args.repeats)
        rows[f"documents_{mean}_meta"] = {"documents": len(lengths), "attention_share": layout.sum_squared_lengths()
                                          / seq ** 2}
    gpu = torch.cuda.get_device_name()
    report = {"meta": {"gpu": gpu, "date": date.today().isoformat(), "torch": torch.__version__, "seq_len": seq,
                       "repeats": args.repeats, "command": "python3 docs/probes/fa4_attention_gpu.py "
                       + " ".join(sys.argv[1:])}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{gpu.split()[-1].lower()}_{report['meta']['date']}_fa4_attention"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def _first(result):
    """FA4's functions return the output or (output, lse)."""
    return result[0] if isinstance(result, tuple) else result


def markdown(report: dict) -> str:
    meta, rows = report["meta"], report["rows"]
    lines = [f"# FlashAttention-4 against cuDNN, {meta['gpu']}, {meta['date']}", "", f"Command: `{meta['command']}`",
             "", f"{meta['seq_len']:,} tokens, 32 query / 8 key-value heads of 128, bf16, forward + backward, torch "
             f"{meta['torch']}.", "", "| row | ms | TFLOP/s (its own FLOPs) | first call s |", "| --- | ---: | ---: | ---: |"]
    for name, value in rows.items():
        if "seconds" in value:
            lines.append(f"| {name} | {value['seconds'] * 1e3:.1f} | {value['tflops']:.0f} | "
                         f"{value['first_call_seconds']:.2f} |")
        elif "error" in value:
            lines.append(f"| {name} | failed: {value['error']} | | |")
    base = rows.get("causal_cudnn", {}).get("tflops")
    if base:
        lines += ["", "Against causal cuDNN: " + ", ".join(
            f"{name} {value['tflops'] / base:.2f}x" for name, value in rows.items() if "tflops" in value)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
