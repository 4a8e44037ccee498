"""Probe: `longtrain eval` at 32K-1M tokens on one GPU (issue 22): time and peak memory per length for a
Llama-2-7B-shaped model with random weights (the systems part; its passkey accuracy is 0 and its loss ln(vocab)).

Per length L the probe runs what `longtrain eval MODEL eval.length=L eval.lengths=[L]` runs after loading
(`orchestrator.eval.run.evaluate` on the built model): perplexity by position over one held-out sequence of L
tokens (synthetic data) and a passkey grid of depths 0, 0.5, 1 with one trial each (eval.filler=repeated), so
four forwards of L tokens through eval's forward (`orchestrator.eval.forward`: position chunks, SDPA's fused
kernels). Per length it records the GPU allocator's peak (reset before the length; all 32 layers' weights are
resident throughout), the predicted peak (`orchestrator.eval.memory`), and the seconds.

Time: causal attention over 1M tokens is 9.0e15 FLOPs a layer, about 18 s a layer on an H200 (~500 TFLOP/s), so
four forwards through 32 layers at 1M would take about 40 minutes and one about 10: beyond the 10-minute command
limit. So each length gets a share of --budget-s, and where 32 layers do not fit in its share the forwards run
through the first k layers (the others' weights stay on the GPU, so the memory is the whole model's: layers run
one at a time, each freeing its activations, so the peak does not depend on how many run) and the report gives
the measured time, the time per layer-forward, and the 32-layer time extrapolated from it (k, and the word
"extrapolated", are in every row). k is chosen from the previous length's time per layer-forward scaled by
(L / previous)^2, an upper bound (the per-token part only grows linearly).

Run from the repository root on a lent H200 machine (about 8 minutes; results are written after each length, so a
run stopped at a time limit keeps the lengths it finished):

    python3 docs/probes/eval_h200.py --out profiles/runs

It writes profiles/runs/<gpu>_<date>_eval_at_length.{json,md}. A CPU smoke run of the same code (a
debug-sized model, seconds): python docs/probes/eval_h200.py --device cpu --preset debug --lengths 1024,2048
--budget-s 60 --out /tmp/eval_probe
"""

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.eval.forward import POSITION_CHUNK, fused_attention  # noqa: E402
from orchestrator.eval.models import EvalModel  # noqa: E402
from orchestrator.eval.run import evaluate  # noqa: E402
from orchestrator.model import LlamaModel, count_parameters  # noqa: E402
from spec.config import load_job_config  # noqa: E402
from spec.units import GIB  # noqa: E402

LENGTHS = (32768, 131072, 262144, 524288, 1048576)
DEPTHS = (0.0, 0.5, 1.0)
FORWARDS = 1 + len(DEPTHS)
"""Forwards of L tokens per length: one perplexity sequence and one passkey trial per depth."""


def job_for(preset: str, length: int):
    return load_job_config(None, [f"model.preset={preset}", "data.source=synthetic", f"eval.length={length}",
                                  f"eval.lengths=[{length}]", f"eval.depths=[{','.join(map(str, DEPTHS))}]",
                                  "eval.trials=1", "eval.sequences=1", "eval.filler=repeated", "eval.digits=5"])


def build(preset: str, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """Random weights made in `dtype` on the device (no float32 copy on the way)."""
    config = load_job_config(None, [f"model.preset={preset}"]).model
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaModel(config).eval()
    finally:
        torch.set_default_dtype(default)


def attention_kernel(model: LlamaModel, device: torch.device) -> str:
    """The SDPA kernel eval's forward gets for this model's causal attention (SDPA's own choice, fused only)."""
    config = model.config
    q = torch.zeros(1, config.num_heads, 4096, config.head_dim, device=device, dtype=model.embed.weight.dtype)
    kv = torch.zeros(1, config.num_kv_heads, 4096, config.head_dim, device=device, dtype=q.dtype)
    try:
        with fused_attention(device):
            choice = torch._fused_sdp_choice(q, kv, kv, is_causal=True, enable_gqa=q.shape[1] != kv.shape[1])
        return torch.nn.attention.SDPBackend(choice).name
    except (AttributeError, RuntimeError, TypeError, ValueError) as error:  # a private torch function: say so
        return f"unknown ({error.__class__.__name__})"


def layers_within(share_s: float, per_layer_forward_s: float, total: int) -> int:
    return max(1, min(total, int(share_s / (FORWARDS * per_layer_forward_s))))


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# `longtrain eval` at length, {meta['gpu']}, {meta['date']}", "", f"Command: `{meta['command']}`", "",
             f"{meta['preset']} shape ({meta['parameters']:,} parameters, {meta['layers']} layers), random weights, "
             f"{meta['dtype']}, eval's forward in chunks of {meta['chunk']:,} positions, SDPA kernel "
             f"{meta['attention_kernel']}; torch {meta['torch']}, {meta['gpu_memory_gib']:.1f} GiB on the GPU. Per "
             f"length: perplexity by position over 1 sequence and a passkey grid (depths {', '.join(map(str, DEPTHS))}, "
             f"1 trial each): {FORWARDS} forwards of L tokens.", "",
             f"| tokens | layers run | perplexity s | passkey s | s per layer-forward | {meta['layers']}-layer forward s "
             "| peak GiB | predicted GiB | reserved GiB |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: |"]
    for row in report["lengths"]:
        if "error" in row:
            lines.append(f"| {row['length']:,} | {row['layers_run']} of {meta['layers']} | failed: {row['error']} "
                         "| | | | | | |")
            continue
        full = f"{row['full_forward_s']:.1f}" + ("" if row["layers_run"] == meta["layers"] else " (extrapolated)")
        lines.append(f"| {row['length']:,} | {row['layers_run']} of {meta['layers']} | {row['perplexity_s']:.1f} | "
                     f"{row['passkey_s']:.1f} | {row['layer_forward_s']:.3f} | {full} | {row['peak_gib']:.2f} | "
                     f"{row['predicted_gib']:.2f} | {row['reserved_gib']:.2f} |")
    lines += ["", "Peak: the GPU allocator's high point during the length (on CPU: the process's peak RSS), weights "
              "included, next to "
              "`predict_forward_peak` (weights + the forward's tensors; the scoring's logits, 4096 positions at a "
              "time, and the kernels' scratch are not in it)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--preset", default="llama-7b")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all lengths together")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="profiles/runs")
    args = parser.parse_args()
    started = time.time()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = [int(n) for n in args.lengths.split(",")]
    model = build(args.preset, device, dtype)
    every_layer = list(model.layers)
    config, total_layers = model.config, len(every_layer)
    on_gpu = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    meta = {"gpu": gpu, "date": date.today().isoformat(), "torch": torch.__version__, "preset": args.preset,
            "parameters": count_parameters(model), "layers": total_layers, "dtype": str(dtype).replace("torch.", ""),
            "chunk": POSITION_CHUNK, "attention_kernel": attention_kernel(model, device) if on_gpu else "cpu",
            "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / GIB if on_gpu else 0.0,
            "budget_s": args.budget_s, "command": "python3 docs/probes/eval_h200.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{gpu.split()[-1].lower()}_{meta['date']}_eval_at_length"
    report = {"meta": meta, "lengths": []}

    warm = job_for(args.preset, 4096)  # CUDA context, cuBLAS handles, kernel selection; and the first estimate
    evaluate(EvalModel("warm-up", config, 4096, None, "", 4096), warm, device, dtype, built=model)
    clock = time.time()
    evaluate(EvalModel("warm-up", config, 4096, None, "", 4096), warm, device, dtype, built=model)
    per_layer, measured_at = (time.time() - clock) / (FORWARDS * total_layers), 4096
    loop_started = time.time()
    for index, length in enumerate(lengths):
        share = (args.budget_s - (time.time() - loop_started)) / (len(lengths) - index)
        estimate = per_layer * (length / measured_at) ** 2
        run = layers_within(share, estimate, total_layers)
        model.layers = torch.nn.ModuleList(every_layer[:run])
        job = job_for(args.preset, length)
        try:
            result = evaluate(EvalModel(f"{args.preset}-random", config, length, None, "", length), job, device,
                              dtype, built=model)
        except RuntimeError as error:  # out of memory or no kernel for this length: recorded, the next one tried
            report["lengths"].append({"length": length, "layers_run": run, "error": str(error).splitlines()[0][:300],
                                      "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if on_gpu else 0.0})
            print(f"{length:>8} tokens: failed: {report['lengths'][-1]['error']}", flush=True)
            stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
            stem.with_suffix(".md").write_text(markdown(report))
            model.layers = torch.nn.ModuleList(every_layer)
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            continue
        model.layers = torch.nn.ModuleList(every_layer)
        seconds = result.seconds["perplexity"] + result.seconds["passkey"]
        per_layer, measured_at = seconds / (FORWARDS * run), length
        report["lengths"].append({
            "length": length, "layers_run": run, "share_s": share, "estimated_layer_forward_s": estimate,
            "perplexity_s": result.seconds["perplexity"], "passkey_s": result.seconds["passkey"],
            "layer_forward_s": per_layer, "full_forward_s": per_layer * total_layers,
            "peak_gib": result.peak_memory_gib, "predicted_gib": result.predicted_peak_gib,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB if on_gpu else 0.0,
            "loss_last_bucket": result.buckets[-1].loss, "passkey_solved": sum(c.solved for c in result.cells)})
        report["meta"]["seconds"] = time.time() - started
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
        stem.with_suffix(".md").write_text(markdown(report))
        row = report["lengths"][-1]
        print(f"{length:>8} tokens: {run}/{total_layers} layers, {seconds:.1f} s, peak {row['peak_gib']:.2f} GiB "
              f"(predicted {row['predicted_gib']:.2f}), 32-layer forward {row['full_forward_s']:.1f} s", flush=True)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
    print(markdown(report))
    print(f"written: {stem}.json and .md in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
