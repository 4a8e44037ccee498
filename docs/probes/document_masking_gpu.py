"""Probe: document-masked attention (data.packing=documents) against causal attention on one GPU (issue 17).

A Llama-3-8B-shaped stack (hidden 4096, 32 query heads, 8 KV heads, head dim 128, SwiGLU 14336; 4 layers by
default) in bf16 on one sequence of --seq-len tokens packed from documents of log-normal lengths (mean --mean-doc,
sigma 1, seeded; the last document cut to fill the sequence exactly, so both runs see the same tokens). Each number
is the median of --repeats timed runs after a warm-up (which includes FlexAttention's compilation):

  attention alone, forward + backward of q [1, 32, S, 128], k and v [1, 8, S, 128]:
    causal          the causal kernel every layer runs (--causal-kernel: sdpa, cuDNN's on an H200; or fa4), on its
                    own FLOPs, q/k/v laid out as the model's projections make them
    documents       longtrain's path with --kernel (flex: FlexAttention compiled, block mask built from the document
                    boundaries; per_document; varlen: FlashAttention-4's variable-length kernel), on the FLOPs the
                    documents need (sum of length^2, halved); --no-candidates times only these two (and the stack)
    causal_flex     FlexAttention with a causal block mask: the same kernel without documents
    documents_varlen  for comparison: SDPA on nested (jagged) tensors, FlashAttention's varlen kernel, k and v
                    heads repeated (not what longtrain runs)
    documents_per_doc  candidate: one fused SDPA causal call per document (the causal row's kernel on each
                    document's slice), outputs concatenated
    per_document_kernel  longtrain's `per_document` kernel (orchestrator/attention_per_document.py): cuDNN's
                    forward and backward ops once per document inside one autograd function, windows of 1K multiples,
                    q/k/v laid out as the model's projections make them
    documents_varlen_attn  candidate: torch.nn.attention.varlen.varlen_attn (FlashAttention's varlen kernel, GQA
                    without repeating heads, [tokens, heads, dim] layout), causal window
    --fresh-layouts N: the documents path and the per-document calls (exact, and windows bucketed to 1K / 4K
                    tokens) each over N new layouts, new lengths every call as in training, where a kernel that
                    compiles per shape (cuDNN builds a graph per sequence length) pays for it
    mask_build      building the documents' block mask (once per micro-batch, shared by every layer)
  the layer stack, forward + backward on the same tokens (no embedding, no LM head):
    causal          positions 0..S-1, the causal kernel
    documents       per-document positions and the documents kernel (the path `longtrain train` runs)

TFLOP/s count model FLOPs (spec.flops' convention: causal attention halved; documents: summed over documents).
Goal (issue 17): documents' attention TFLOP/s >= 0.85 x causal's; the stack's step time on the same tokens shows
what skipping the masked blocks buys.

Run from the repository root on the GPU machine (about 5 minutes at 128K on an H200):

    python docs/probes/document_masking_gpu.py --out profiles/runs

It writes profiles/runs/<gpu>_<date>_document_masking.{json,md}. --quick: 16K tokens, 2 layers, 2 repeats (smoke).
"""

import argparse
import json
import math
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.attention import (DocumentLayout, causal_attention, document_attention,  # noqa: E402
                                    document_block_mask)
from orchestrator.attention_per_document import windows  # noqa: E402
from orchestrator.model import DecoderLayer, rope_tables  # noqa: E402
from spec.config import ModelConfig  # noqa: E402
from spec.flops import attention_training_flops, layer_matmul_params  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                 rope_theta=500000.0)


def document_lengths(seq_len: int, mean: float, seed: int) -> list:
    """Log-normal lengths (sigma 1, this mean), at least 1 token, drawn until they fill seq_len; the last one cut."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    lengths, total = [], 0
    while total < seq_len:
        length = int(min(max(1, rng.lognormal(math.log(mean) - sigma**2 / 2, sigma)), seq_len - total))
        lengths.append(length)
        total += length
    return lengths


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def attention_rows(model: ModelConfig, layout: DocumentLayout, repeats: int, causal_kernel: str = "sdpa",
                   candidates: bool = True) -> dict:
    from torch.nn.attention.flex_attention import flex_attention

    seq, heads, kv_heads, dim = layout.seq_len, model.num_heads, model.num_kv_heads, model.head_dim
    shape = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(1, heads, seq, dim, **shape)
    k, v = torch.randn(1, kv_heads, seq, dim, **shape), torch.randn(1, kv_heads, seq, dim, **shape)
    grad = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    one_layer = ModelConfig(**{**LLAMA3_8B, "num_layers": 1})
    causal_flops = attention_training_flops(one_layer, seq * seq)
    document_flops = attention_training_flops(one_layer, layout.sum_squared_lengths())

    def run(attend):
        def step():
            out = attend(q, k, v)
            torch.autograd.grad(out, (q, k, v), grad)
        return step

    model_layout = model_layout_tensors(seq, heads, kv_heads, dim)  # as the model's projections lay them out

    def run_model_layout(attend):
        return lambda: torch.autograd.grad(attend(*model_layout[:3]), model_layout[:3], model_layout[3])

    rows = {
        "causal": (timed(run_model_layout(lambda a, b, c: causal_attention(a, b, c, causal_kernel)), repeats),
                   causal_flops),
        "documents": (timed(run_model_layout(lambda a, b, c: document_attention(a, b, c, layout, causal_kernel)),
                            repeats), document_flops),
    }
    if not candidates:
        return _attention_result(rows, layout, repeats, "not recorded")
    causal_mask = document_block_mask(torch.zeros(1, seq, dtype=torch.int32, device="cuda"))  # one segment
    compiled = torch.compile(flex_attention, dynamic=False)
    rows["causal_flex"] = (timed(run(lambda a, b, c: compiled(a, b, c, block_mask=causal_mask, enable_gqa=True)),
                                 repeats), causal_flops)
    try:  # another maintained kernel: flash varlen through SDPA on nested (jagged) tensors, for comparison
        rows["documents_varlen"] = (timed(run(lambda a, b, c: varlen_attention(a, b, c, layout.lengths[0])),
                                          repeats), document_flops)
    except Exception as error:  # noqa: BLE001 - a row that cannot run says why
        print(f"documents_varlen: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    spans = np.cumsum([0] + list(layout.lengths[0]))
    rows["documents_per_doc"] = (timed(run(lambda a, b, c: per_document_sdpa(a, b, c, layout.lengths[0])), repeats),
                                 document_flops)
    per_document = DocumentLayout(layout.lengths, layout.padding, kernel="per_document")
    rows["per_document_kernel"] = (timed(run_model_layout(lambda a, b, c: document_attention(a, b, c, per_document)),
                                         repeats), document_flops)
    try:
        from torch.nn.attention.varlen import varlen_attn

        cu = torch.tensor(spans, device="cuda", dtype=torch.int32)
        longest = int(max(layout.lengths[0]))
        flat = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
        tq, tk, tv = (torch.randn(seq, heads, dim, **flat), torch.randn(seq, kv_heads, dim, **flat),
                      torch.randn(seq, kv_heads, dim, **flat))
        tgrad = torch.randn(seq, heads, dim, device="cuda", dtype=torch.bfloat16)

        def varlen_step():
            out = varlen_attn(tq, tk, tv, cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=True)
            torch.autograd.grad(out, (tq, tk, tv), tgrad)
        rows["documents_varlen_attn"] = (timed(varlen_step, repeats), document_flops)
    except Exception as error:  # noqa: BLE001 - a row that cannot run says why
        print(f"documents_varlen_attn: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    try:
        backend = torch.nn.attention.SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=True)).name
    except Exception as error:  # noqa: BLE001 - a private torch function
        backend = f"unknown ({type(error).__name__})"
    print(f"causal SDPA backend: {backend}")
    return _attention_result(rows, layout, repeats, backend)


def _attention_result(rows: dict, layout: DocumentLayout, repeats: int, backend: str) -> dict:
    build = timed(lambda: DocumentLayout(layout.lengths, layout.padding).block_mask("cuda"), repeats)
    result = {name: {"seconds": s, "tflops": f / s / 1e12, "flops": f} for name, (s, f) in rows.items()}
    result["mask_build"] = {"seconds": build}
    result["causal_backend"] = backend
    return result


def model_layout_tensors(seq: int, heads: int, kv_heads: int, dim: int):
    """q, k, v (requiring grad) and an output gradient stored [B, S, H, D] and seen as [B, H, S, D], as the model's
    projections and its output projection's backward make them."""
    def make(h, grad=True):
        return torch.randn(1, seq, h, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_(grad)
    return make(heads), make(kv_heads), make(kv_heads), make(heads, False)


def per_document_sdpa(q, k, v, lengths, bucket: int = 0):
    """Causal attention per document: one fused SDPA call on each document's slice (the causal row's kernel), on
    the windows `per_document` uses (`orchestrator.attention_per_document.windows`: bucket > 0 extends each into
    the tokens after it, up to a multiple of `bucket`, so calls share a few shapes and cuDNN's compiled graphs;
    causal attention keeps the document's rows blind to the extension, whose rows are dropped)."""
    outputs = []
    for s, e, w in windows(lengths, q.shape[2], bucket):
        out = F.scaled_dot_product_attention(q[:, :, s:w], k[:, :, s:w], v[:, :, s:w], is_causal=True,
                                             enable_gqa=True)
        outputs.append(out[:, :, :e - s])
    return torch.cat(outputs, dim=2)


def fresh_layout_rows(model: ModelConfig, seq: int, mean: int, seed: int, layouts: int) -> dict:
    """Each kernel over `layouts` new document layouts (new lengths every call, as every micro-batch of training
    brings): what a kernel that compiles per shape (cuDNN builds a graph per new sequence length) costs in training.
    Per kernel: the seconds of each call in order (the first calls pay the builds) and TFLOP/s over all of them."""
    heads, kv_heads, dim = model.num_heads, model.num_kv_heads, model.head_dim
    shape = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(1, heads, seq, dim, **shape)
    k, v = torch.randn(1, kv_heads, seq, dim, **shape), torch.randn(1, kv_heads, seq, dim, **shape)
    grad = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    one_layer = ModelConfig(**{**LLAMA3_8B, "num_layers": 1})
    layouts_lengths = [document_lengths(seq, mean, seed + 1000 + i) for i in range(layouts)]
    laid = model_layout_tensors(seq, heads, kv_heads, dim)
    kernels = {
        "documents": lambda lengths: document_attention(q, k, v, DocumentLayout([lengths], [0], kernel="flex")),
        "per_document_kernel": lambda lengths: document_attention(*laid[:3], DocumentLayout([lengths], [0],
                                                                                         kernel="per_document")),
        "documents_per_doc": lambda lengths: per_document_sdpa(q, k, v, lengths),
        "documents_per_doc_bucket1k": lambda lengths: per_document_sdpa(q, k, v, lengths, 1024),
        "documents_per_doc_bucket4k": lambda lengths: per_document_sdpa(q, k, v, lengths, 4096),
    }
    rows = {}
    for name, attend in kernels.items():
        seconds, flops = [], []
        for lengths in layouts_lengths:
            torch.cuda.synchronize()
            started = time.perf_counter()
            if name == "per_document_kernel":
                torch.autograd.grad(attend(lengths), laid[:3], laid[3])
            else:
                torch.autograd.grad(attend(lengths), (q, k, v), grad)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
            flops.append(attention_training_flops(one_layer, sum(n * n for n in lengths)))
        half = layouts // 2
        rows[name] = {"seconds": seconds, "tflops": sum(flops) / sum(seconds) / 1e12,
                      "tflops_last_half": sum(flops[half:]) / sum(seconds[half:]) / 1e12}
        print(f"fresh layouts, {name}: " + " ".join(f"{t * 1e3:.0f}" for t in seconds) + " ms", flush=True)
    return rows


def varlen_attention(q, k, v, lengths):
    """Causal attention per document through SDPA on nested jagged tensors (FlashAttention's varlen kernel); k and
    v heads repeated for the query groups."""
    offsets = torch.tensor(np.cumsum([0] + list(lengths)), device=q.device, dtype=torch.int64)
    groups = q.shape[1] // k.shape[1]

    def jagged(x):  # [1, H, S, D] -> [documents, H, j, D]
        return torch.nested.nested_tensor_from_jagged(x[0].transpose(0, 1).contiguous(), offsets).transpose(1, 2)

    out = F.scaled_dot_product_attention(jagged(q), jagged(k.repeat_interleave(groups, 1)),
                                         jagged(v.repeat_interleave(groups, 1)), is_causal=True)
    return out.transpose(1, 2).values().transpose(0, 1)[None]


def stack_rows(model: ModelConfig, layout: DocumentLayout, repeats: int, causal_kernel: str = "sdpa") -> dict:
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(DecoderLayer(model) for _ in range(model.num_layers)).cuda().to(torch.bfloat16)
    for layer in layers:
        layer.attn.kernel = causal_kernel
    seq = layout.seq_len
    x = torch.randn(1, seq, model.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    starts = np.cumsum([0] + layout.lengths[0][:-1])
    positions = torch.from_numpy(np.arange(seq) - np.repeat(starts, layout.lengths[0])).cuda()
    matmuls = 3 * 2.0 * model.num_layers * layer_matmul_params(model) * seq

    def run(positions, documents):
        cos, sin = rope_tables(positions, model.head_dim, model.rope_theta, torch.bfloat16)
        cos, sin = cos.view(1, 1, seq, -1), sin.view(1, 1, seq, -1)

        def step():
            hidden = x
            for layer in layers:
                layer.attn.documents = documents
                hidden = layer(hidden, cos, sin)
            torch.autograd.grad(hidden, [x, *layers.parameters()], grad)
        return step

    rows = {}
    for name, pos, documents, squares in (("causal", torch.arange(seq, device="cuda"), None, seq * seq),
                                          ("documents", positions, layout, layout.sum_squared_lengths())):
        torch.cuda.reset_peak_memory_stats()
        seconds = timed(run(pos, documents), repeats)
        flops = matmuls + attention_training_flops(model, squares)
        rows[name] = {"seconds": seconds, "tokens_per_second": seq / seconds, "tflops": flops / seconds / 1e12,
                      "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    return rows


def markdown(result: dict, command: str) -> str:
    attention, stack, meta = result["attention"], result["stack"], result["meta"]
    ratio = attention["documents"]["tflops"] / attention["causal"]["tflops"]
    lines = [f"# Document-masked vs causal attention, {meta['gpu']}, {meta['date']}", "",
             f"Command: `{command}`", "",
             f"Llama-3-8B-shaped layers ({meta['layers']} in the stack), bf16, {meta['seq_len']:,} tokens packed from "
             f"{meta['documents']} documents (log-normal, mean {meta['mean_doc']:,}, seed {meta['seed']}); attention "
             f"the documents need: {meta['attention_share']:.1%} of causal. torch {meta['torch']}. Kernels: causal "
             f"{meta.get('causal_kernel', 'sdpa')}, documents {meta.get('kernel', 'flex')}.", "",
             "| attention fwd+bwd | ms | TFLOP/s (on its own FLOPs) |", "| --- | ---: | ---: |"]
    for name in ("causal", "documents", "causal_flex", "documents_varlen", "documents_per_doc",
                 "per_document_kernel", "documents_varlen_attn"):
        if name not in attention:
            continue
        row = attention[name]
        lines.append(f"| {name} | {row['seconds'] * 1e3:.1f} | {row['tflops']:.0f} |")
    fresh = result.get("fresh_layouts", {})
    lines += [f"| {name} over {len(row['seconds'])} new layouts | {sum(row['seconds']) * 1e3:.1f} | "
              f"{row['tflops']:.0f} (last half {row['tflops_last_half']:.0f}) |" for name, row in fresh.items()]
    lines += [f"| mask_build | {attention['mask_build']['seconds'] * 1e3:.2f} | |", "",
              f"Causal SDPA's kernel: {attention.get('causal_backend', 'not recorded')}.", "",
              f"documents / causal TFLOP/s: **{ratio:.2f}x** (goal >= 0.85x)"] + [
              f"{name} / causal: {attention[name]['tflops'] / attention['causal']['tflops']:.2f}x"
              for name in ("documents_per_doc", "per_document_kernel", "documents_varlen_attn")
              if name in attention] + ["",
              "| stack fwd+bwd | s | tokens/s | TFLOP/s (model FLOPs) | peak GiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, row in stack.items():
        lines.append(f"| {name} | {row['seconds']:.3f} | {row['tokens_per_second']:,.0f} | {row['tflops']:.0f} | "
                     f"{row['peak_allocated_gib']:.1f} |")
    speedup = stack["causal"]["seconds"] / stack["documents"]["seconds"] if stack else 0.0
    lines += ["", f"Step time on the same tokens: documents {speedup:.2f}x faster than causal."] if stack else []
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mean-doc", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="16K tokens, 2 layers, 2 repeats")
    parser.add_argument("--attention-only", action="store_true", help="skip the layer stack's rows")
    parser.add_argument("--fresh-layouts", type=int, default=0,
                        help="also time each kernel over this many new layouts (new lengths every call)")
    parser.add_argument("--kernel", choices=("flex", "per_document", "varlen"), default="flex",
                        help="the documents rows' kernel (data.document_attention)")
    parser.add_argument("--causal-kernel", choices=("sdpa", "fa4"), default="sdpa",
                        help="the causal rows' kernel (train.attention_kernel)")
    parser.add_argument("--no-candidates", action="store_true",
                        help="time only the causal and documents rows (no candidate kernels)")
    parser.add_argument("--out", default="profiles/runs")
    args = parser.parse_args()
    if args.quick:
        args.seq_len, args.layers, args.repeats, args.mean_doc = 16384, 2, 2, 2048
    model = ModelConfig(**{**LLAMA3_8B, "num_layers": args.layers})
    lengths = document_lengths(args.seq_len, args.mean_doc, args.seed)
    layout = DocumentLayout([lengths], [0], kernel=args.kernel)
    gpu = torch.cuda.get_device_name()
    meta = {"gpu": gpu, "date": date.today().isoformat(), "torch": torch.__version__, "seq_len": args.seq_len,
            "layers": args.layers, "mean_doc": args.mean_doc, "seed": args.seed, "documents": len(lengths),
            "document_lengths": lengths, "attention_share": layout.sum_squared_lengths() / args.seq_len**2,
            "repeats": args.repeats, "kernel": args.kernel, "causal_kernel": args.causal_kernel}
    result = {"meta": meta, "attention": attention_rows(model, layout, args.repeats, args.causal_kernel,
                                                        not args.no_candidates)}
    torch.cuda.empty_cache()
    if args.fresh_layouts:
        result["fresh_layouts"] = fresh_layout_rows(model, args.seq_len, args.mean_doc, args.seed, args.fresh_layouts)
    result["stack"] = {} if args.attention_only else stack_rows(model, layout, args.repeats, args.causal_kernel)
    command = "python docs/probes/document_masking_gpu.py " + " ".join(sys.argv[1:])
    result["command"] = command
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"{gpu.split()[-1].lower()}_{meta['date']}_document_masking" + ("_quick" if args.quick else "")
            + ("" if args.mean_doc == 16384 else f"_mean{args.mean_doc // 1024}k")
            + ("" if args.kernel == "flex" else f"_{args.kernel}")
            + ("" if args.causal_kernel == "sdpa" else f"_{args.causal_kernel}"))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result, command))
    print(markdown(result, command))
    print(f"written: {out / stem}.json and .md")


if __name__ == "__main__":
    main()
