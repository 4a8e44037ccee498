"""Probe: FlexAttention kernel options for document-masked attention at 128K tokens on one GPU (issue 17).

The document-masked path (orchestrator.attention: FlexAttention compiled, block mask built from the document
boundaries) ran at 0.73x the TFLOP/s of causal SDPA on an H200 with default options (docs/log.md). This times the
same attention (Llama-3-8B heads: 32 query, 8 KV, head dim 128; bf16; documents log-normal, mean 16K, seed 0;
forward and forward + backward separately) under several `kernel_options`, each compiled afresh, against SDPA
causal, so a default can be chosen from a measurement.

    python docs/probes/flex_kernel_options_gpu.py [--seq-len 131072] [--configs all] > out.txt
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from document_masking_gpu import document_lengths, timed  # noqa: E402
from orchestrator.attention import DocumentLayout  # noqa: E402

CONFIGS = {
    "default": {},
    "tma": {"USE_TMA": True},
    "safe_rows_prescale": {"ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True},
    "fwd_128x128_w8_s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 3},
    "fwd_128x64_w8_s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 3},
    "tma_safe_fwd_128x128": {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True, "fwd_BLOCK_M": 128,
                             "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 3},
    "best_fwd_bwd_64x128_w8_s3": {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True, "fwd_BLOCK_M": 128,
                                  "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 3, "bwd_BLOCK_M1": 64,
                                  "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64, "bwd_num_warps": 8,
                                  "bwd_num_stages": 3},
    "best_fwd_bwd_32x128_w4_s3": {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True, "fwd_BLOCK_M": 128,
                                  "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 3, "bwd_BLOCK_M1": 32,
                                  "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32, "bwd_num_warps": 4,
                                  "bwd_num_stages": 3},
    "best_fwd_no_write_dq": {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True, "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128,
                             "fwd_num_warps": 8, "fwd_num_stages": 3, "WRITE_DQ": False},
}
MAX_AUTOTUNE = "max_autotune"
"""Not an option set: torch.compile(mode="max-autotune-no-cudagraphs") searches the kernel configurations itself."""


def main() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--configs", default="all")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seq = args.seq_len
    layout = DocumentLayout([document_lengths(seq, 16384, 0)], [0], kernel="flex")
    mask = layout.block_mask("cuda")
    shape = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = torch.randn(1, 32, seq, 128, **shape), torch.randn(1, 8, seq, 128, **shape), torch.randn(1, 8, seq, 128, **shape)
    grad = torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16)
    squares = layout.sum_squared_lengths()
    forward_flops = 4 * 4096 * squares / 2  # one layer, causal-halved, summed over documents
    causal_forward = 4 * 4096 * seq * seq / 2

    def rates(attend, flops):
        forward = timed(lambda: attend(q, k, v), args.repeats)
        both = timed(lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), grad), args.repeats)
        return {"forward_tflops": flops / forward / 1e12, "fwd_bwd_tflops": 3 * flops / both / 1e12,
                "forward_ms": forward * 1e3, "fwd_bwd_ms": both * 1e3}

    results = {"sdpa_causal": rates(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True,
                                                                                  enable_gqa=True), causal_forward)}
    print(json.dumps({"sdpa_causal": results["sdpa_causal"]}), flush=True)
    names = [*CONFIGS, MAX_AUTOTUNE] if args.configs == "all" else args.configs.split(",")
    for name in names:
        torch._dynamo.reset()
        mode = "max-autotune-no-cudagraphs" if name == MAX_AUTOTUNE else None
        compiled = torch.compile(flex_attention, dynamic=False, mode=mode)
        options = CONFIGS.get(name, {})
        started = time.perf_counter()
        try:
            results[name] = rates(lambda a, b, c: compiled(a, b, c, block_mask=mask, enable_gqa=True,
                                                          kernel_options=options), forward_flops)
            results[name]["with_compile_s"] = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - a config that does not compile says why
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps({"meta": {"seq_len": seq, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "attention_share": squares / seq**2}, "results": results}))


if __name__ == "__main__":
    main()
