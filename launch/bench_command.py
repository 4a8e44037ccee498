"""`longtrain bench`: activation strategies side by side on this machine's GPU; JSON, Markdown and PNG out."""

import json
import time
from pathlib import Path
from typing import Dict, List, Optional

from launch.paths import check_writable_dir
from spec.errors import LongtrainError


def run_bench_command(layers: int, seq_lens: List[int], modes: List[str], repeats: int, out: Optional[str],
                      profile_name: Optional[str], plan_fraction: Optional[float] = None, trace: bool = False,
                      policy: Optional[str] = None, swap_hidden: Optional[float] = None,
                      elementwise: str = "eager", attention_kernel: str = "sdpa", allocator: str = "caching") -> int:
    import torch

    from launch.cli import BENCH_MODES

    unknown = sorted(set(modes) - set(BENCH_MODES))  # the flags first: a typo is named on any machine
    if unknown:
        raise LongtrainError(f"--modes {','.join(unknown)} unknown; valid: {','.join(BENCH_MODES)}")
    hand_policy = parse_policy(policy) if policy else None
    if allocator == "planned":  # before anything initialises CUDA (the imports below may)
        from orchestrator.memory import replay_allocator

        replay_allocator.install()
    from launch.measure.bench import BenchOptions, longest_trained, run_bench
    from spec.hardware import detect_profile_name, load_profile

    if not torch.cuda.is_available():
        raise LongtrainError("longtrain bench measures a GPU and this machine has no CUDA device; run it on the "
                             "GPU machine (see README, 'On a GPU')")
    profile = load_profile(profile_name or detect_profile_name(torch.cuda.get_device_name()))
    check_writable_dir(out or "profiles/runs", "--out")
    stem = Path(out or "profiles/runs") / (f"{profile.name}_{time.strftime('%Y-%m-%d')}_bench-{layers}l"
                                           + ("" if elementwise == "eager" else f"-{elementwise}")
                                           + ("" if attention_kernel == "sdpa" else f"-{attention_kernel}"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    options = BenchOptions(plan_fraction=plan_fraction, swap_hidden_fraction=swap_hidden,
                           hand_policy=hand_policy, trace=trace,
                           trace_dir=str(stem.parent) if trace else None, elementwise=elementwise,
                           attention_kernel=attention_kernel)
    device = torch.cuda.get_device_name()
    print(f"longtrain bench: {layers} Llama-7B-shaped layers on {device} (profile {profile.name}), "
          f"seq_len {seq_lens}, {repeats} timed steps per row after one warm-up")
    print(_header())
    rows = run_bench(layers, seq_lens, modes, profile, repeats, on_row=_print_row, options=options)
    longest = ", ".join(f"{mode} {seq:,}" for mode, seq in longest_trained(rows).items())
    print(f"longest sequence trained: {longest}")
    meta = {"device": device, "profile": profile.name, "layers": layers, "repeats": repeats,
            "torch": torch.__version__, "command": f"longtrain bench --layers {layers} --seq-lens "
            f"{','.join(map(str, seq_lens))} --modes {','.join(modes)} --repeats {repeats}"
                       + (f" --plan-fraction {plan_fraction}" if plan_fraction else "")
                       + (f" --policy {policy}" if policy else "")
                       + (f" --swap-hidden {swap_hidden}" if swap_hidden is not None else "")
                       + (" --trace" if trace else "")
                       + (f" --allocator {allocator}" if allocator != "caching" else "")
                       + (f" --elementwise {elementwise}" if elementwise != "eager" else "")
                       + (f" --attention-kernel {attention_kernel}" if attention_kernel != "sdpa" else "")}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(markdown(meta, rows) + f"\nLongest sequence trained: {longest}\n")
    plot(rows, stem.with_suffix(".png"), meta)
    print(f"wrote {stem}.json, .md, .png")
    return 0


def parse_policy(text: str):
    """'KEEP/SWAP/RECOMPUTE[/host]' -> one layer's decision (a `LayerPlan`, given to every layer); the fractions
    must sum to 1."""
    from spec.plan import LayerPlan

    parts = text.split("/")
    offload = parts[3:] == ["host"]
    try:
        keep, swap, recompute = (float(p) for p in parts[:3])
    except ValueError:
        keep = swap = recompute = -1.0
    if len(parts) not in (3, 4) or (len(parts) == 4 and not offload) or min(keep, swap, recompute) < 0 \
            or abs(keep + swap + recompute - 1) > 1e-6:
        raise LongtrainError(f"--policy {text!r} must be KEEP/SWAP/RECOMPUTE fractions summing to 1, optionally "
                             "followed by /host, e.g. 0/1/0 or 0.2/0.5/0.3/host")
    return LayerPlan(0, keep, swap, recompute, offload)


def _print_row(row) -> None:
    print(_line(vars(row)), flush=True)
    if row.trace:
        print(row.trace, flush=True)


def _header() -> str:
    return f"{'mode':<19} {'seq':>8} {'status':<12} {'step s':>8} {'tok/s':>9} {'MFU':>6} {'MFU-full':>8} " \
           f"{'alloc GiB':>9} {'resv GiB':>8} {'host GiB':>8} {'fwd GiB':>7}  note"


def _line(r: Dict) -> str:
    return (f"{r['mode']:<19} {r['seq_len']:>8} {r['status']:<12} {r['step_seconds']:>8.3f} "
            f"{r['tokens_per_second']:>9,.0f} {r['mfu']:>6.1%} {r['mfu_full_attention']:>8.1%} "
            f"{r['peak_allocated_gib']:>9.1f} {r['peak_reserved_gib']:>8.1f} {r['host_gib']:>8.1f} "
            f"{r['after_forward_gib']:>7.1f}  {_prediction(r)}{_retries(r)}{r['note']}")


def _prediction(r: Dict) -> str:
    """Planner vs measured for longtrain rows: step time and peak allocated, as ratios."""
    if not r.get("predicted_step_seconds") or r["status"] != "ok":
        return ""
    step_error = r["predicted_step_seconds"] / r["step_seconds"] - 1
    peak_error = r["predicted_peak_gib"] / r["peak_allocated_gib"] - 1
    return (f"predicted {r['predicted_step_seconds']:.3f} s ({step_error:+.0%}), "
            f"{r['predicted_peak_gib']:.1f} GiB ({peak_error:+.0%}); ")


def _retries(r: Dict) -> str:
    return f"allocator retries {r['alloc_retries']}; " if r.get("alloc_retries") else ""


def markdown(meta: Dict, rows: List[Dict]) -> str:
    lines = [f"# longtrain bench: {meta['layers']} Llama-7B-shaped layers on {meta['device']}", "",
             f"Command: `{meta['command']}` (torch {meta['torch']}; profile {meta['profile']}; MFU = model "
             "FLOPs of the layers, causal-halved and full-attention, against the profile's bf16 peak).", "",
             "| mode | seq | status | step s | tokens/s | MFU | MFU full-attn | peak alloc GiB | peak reserved GiB "
             "| host GiB | after forward GiB | note |", "|" + " --- |" * 12]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['seq_len']} | {r['status']} | {r['step_seconds']:.3f} | "
                     f"{r['tokens_per_second']:,.0f} | {r['mfu']:.1%} | {r['mfu_full_attention']:.1%} | "
                     f"{r['peak_allocated_gib']:.1f} | {r['peak_reserved_gib']:.1f} | {r['host_gib']:.1f} | "
                     f"{r.get('after_forward_gib', 0.0):.1f} | {_prediction(r)}{_retries(r)}{r['note']} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], path: Path, meta: Dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (mfu_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        ok = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
        if ok:
            mfu_axis.plot([r["seq_len"] for r in ok], [100 * r["mfu"] for r in ok], marker="o", label=mode)
            memory_axis.plot([r["seq_len"] for r in ok], [r["peak_reserved_gib"] for r in ok], marker="o",
                             label=mode)
    for axis, label in ((mfu_axis, "MFU % (causal-halved)"), (memory_axis, "peak reserved GiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    figure.suptitle(f"{meta['layers']} Llama-7B-shaped layers on {meta['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
