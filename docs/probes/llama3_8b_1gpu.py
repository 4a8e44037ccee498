"""Llama-3-8B shape, LoRA rank 16, one GPU: longtrain's plan against DeepSpeed's ALST recipe (issue 18).

One recipe per invocation, through the real training loop (`orchestrator.trainer.train`) in this process (one
worker, no Ray: the loop does not know Ray), random weights, synthetic tokens. Writes the trainer's step readings
(loss, seconds, MFU, peak GPU allocated / reserved, peak host RSS, pinned swap bytes) as JSON lines to --out, and
one summary line with the wall time of the whole call.

    python docs/probes/llama3_8b_1gpu.py --recipe longtrain --plan PLAN.yaml --seq-len 262144 --out OUT.jsonl
    python docs/probes/llama3_8b_1gpu.py --recipe alst --seq-len 262144 --out OUT.jsonl
    python docs/probes/llama3_8b_1gpu.py --recipe longtrain --smoke --out /tmp/x.jsonl   # CPU, debug shape

The longtrain recipe's overrides must be the ones its plan was made with (`longtrain plan` with the same
`common + longtrain` overrides printed by --print-overrides); the worker refuses another plan.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

COMMON = ["model.preset=llama3-8b", "model.lora.rank=16", "model.lora.alpha=32", "data.source=synthetic",
          "data.micro_batch_size=1", "cluster.num_workers=1", "train.max_steps=10", "optim.warmup_steps=1",
          "metrics.hardware_profile=h200_1x_lent", "metrics.warmup_steps=0", "train.log_every_steps=1",
          "checkpoint.every_steps=0", "checkpoint.at_end=false"]
RECIPES = {
    "longtrain": ["train.tiled_mlp=true", "plan.gpu_memory_fraction=0.8", "plan.host_memory_fraction=0.6"],
    "alst": ["train.activation_checkpointing=alst", "train.zero_stage=3"],
}
FULL_3B = ["model.hidden_size=3072", "model.num_layers=28", "model.num_heads=24", "model.num_kv_heads=8",
           "model.intermediate_size=8192", "model.tie_embeddings=true", "model.lora.rank=0",
           "train.offload.optimizer=true"]
"""--full-3b: full fine-tuning of the Llama-3.2-3B shape with the optimizer offloaded to CPU (DeepSpeed's CPU Adam,
built on first use), for both recipes (longtrain's on ZeRO-2, ALST's on ZeRO-3): the 8B's offloaded optimizer (140.8 GiB
of DeepSpeed's host buffers, `planner.offload_host`) does not fit a 128 GiB host."""
FULL_3B_HELP = "full fine-tuning of the Llama-3.2-3B shape, optimizer offloaded (both recipes)"
FULL_3B_RECIPES = {"longtrain": ["train.zero_stage=2"], "alst": []}
SMOKE = ["model.preset=debug", "model.lora.rank=4", "data.source=synthetic", "data.micro_batch_size=1",
         "cluster.num_workers=1", "train.max_steps=10", "optim.warmup_steps=1", "metrics.warmup_steps=0",
         "train.log_every_steps=1", "checkpoint.every_steps=0", "checkpoint.at_end=false"]
SMOKE_RECIPES = {"longtrain": ["train.tiled_mlp=true"],
                 "alst": ["train.activation_checkpointing=deepspeed", "train.tiled_mlp=true", "train.zero_stage=3"]}


def overrides(recipe: str, seq_len: int, steps: int, plan: str, smoke: bool, full_3b: bool = False) -> list:
    base = (SMOKE + SMOKE_RECIPES[recipe]) if smoke else (COMMON + RECIPES[recipe])
    if full_3b:
        base = base + FULL_3B + FULL_3B_RECIPES[recipe]
    extra = [f"data.seq_len={seq_len}", f"train.stop_at_step={steps}"]
    return base + extra + ([f"plan.path={plan}"] if plan else [])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    parser.add_argument("--seq-len", type=int, default=262144)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--plan")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="debug shape on CPU: the plumbing, not the numbers")
    parser.add_argument("--full-3b", action="store_true", help=FULL_3B_HELP)
    parser.add_argument("--print-overrides", action="store_true")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides (also given to `longtrain plan`)")
    args = parser.parse_args()
    chosen = overrides(args.recipe, args.seq_len, args.steps, args.plan, args.smoke, args.full_3b) + args.overrides
    if args.print_overrides:
        print(" ".join(o for o in chosen if not o.startswith(("plan.path", "train.stop_at_step"))))
        return 0
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    from orchestrator.trainer import WorkerInfo, train
    from spec.config import load_job_config

    job = load_job_config(None, chosen)
    if job.train.allocator == "planned":  # what the Ray launcher does in a worker, before CUDA is first used
        from orchestrator.memory import replay_allocator

        replay_allocator.install()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with out.open("w") as sink, tempfile.TemporaryDirectory() as run_dir:
        def publish(message):
            if message.get("kind") == "step":
                for row in message["rows"]:
                    sink.write(json.dumps({"recipe": args.recipe, "seq_len": args.seq_len, **row}) + "\n")
                    sink.flush()
                    print(f"{args.recipe} step {row['step']}: loss {row['loss']:.4f}, {row['step_seconds']:.1f} s, "
                          f"MFU {row['mfu']:.1%}, peak allocated {row['peak_allocated_gib']:.1f} GiB, reserved "
                          f"{row['peak_reserved_gib']:.1f} GiB, host RSS {row['host_rss_gib']:.1f} GiB, swap "
                          f"{row['swap_host_gib']:.1f} GiB", flush=True)

        train(job, Path(run_dir), WorkerInfo(0, 1, 0, "node0"), publish)
        sink.write(json.dumps({"recipe": args.recipe, "wall_seconds": time.perf_counter() - started,
                               "overrides": chosen}) + "\n")
    print(f"{args.recipe}: whole call {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
