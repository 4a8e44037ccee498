"""Time and host memory of `longtrain export` at Llama-3-8B scale (issue 16), on a machine too small for an 8B engine.

A ZeRO-3 engine of the 8B shape needs far more host memory than the 24 GiB machine this ran on (fp32 parameter
partitions, DeepSpeed's fp32 copies and gradient buffers: about 12 bytes a parameter without optimizer state), so:

  save     a real DeepSpeed ZeRO-3 save over 2 gloo ranks (spawned, CPU) of the llama3-8b shape with --layers layers
           (the 8B's tensors: 128256 x 4096 embedding and head, 4096-wide layers), random weights, SGD without
           momentum (no optimizer state), written as a longtrain run directory (config.yaml, checkpoints/TAG,
           COMPLETE). Exported as it is, it is the largest real measurement that fits.
  inflate  the same files for another number of layers (default 32: the whole 8B): the template save's dicts with
           param_shapes and each rank's fp32 flat partitions rebuilt as DeepSpeed lays them out (each parameter cut
           into ceil(numel / 2) elements a rank, sub-groups of at most sub_group_size elements), random values.
           Not an engine's save: the files zero_to_fp32 reads, at full size.
  measure  `longtrain export RUN OUT` in a subprocess, its /proc/PID/status sampled every 50 ms: peak VmRSS,
           RssAnon (what the process itself holds) and RssFile (checkpoint pages mapped from the page cache,
           which the kernel drops under pressure), and the wall time.

    python docs/probes/export_memory.py save /data/ex/run1 --layers 1
    python docs/probes/export_memory.py inflate /data/ex/run1 /data/ex/run32 --layers 32
    python docs/probes/export_memory.py measure /data/ex/run32 /data/ex/hf32 --dtype bf16
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TAG = "step_00000001"
WORLD = 2


def job_overrides(layers: int):
    return ["model.preset=llama3-8b", f"model.num_layers={layers}", "cluster.num_workers=2", "train.zero_stage=3",
            "data.source=synthetic", "data.seq_len=128", "data.micro_batch_size=1"]


def _write_run(run: Path, layers: int) -> None:
    from spec.config import job_to_yaml, load_job_config

    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(job_to_yaml(load_job_config(None, job_overrides(layers))))


def _save_rank(rank, world, put, run, layers):
    import deepspeed

    from orchestrator.model import LlamaModel
    from spec.config import load_job_config

    torch.manual_seed(rank)
    torch.set_num_threads(1)
    job = load_job_config(None, job_overrides(layers))
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = LlamaModel(job.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.save_checkpoint(str(Path(run) / "checkpoints"), tag=TAG, save_latest=True)
    put(rank)


def save(run: Path, layers: int) -> None:
    from tests.conftest import spawn_gloo

    _write_run(run, layers)
    started = time.time()
    spawn_gloo(_save_rank, WORLD, str(run), layers)
    (run / "checkpoints" / TAG / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": WORLD}))
    print(f"saved {run} ({layers} layers) in {time.time() - started:.0f} s")


def _full_shapes(layers: int) -> "OrderedDict[str, torch.Size]":
    from orchestrator.checkpoint.init_from import model_shapes
    from spec.config import load_job_config

    shapes = model_shapes(load_job_config(None, job_overrides(layers)).model)
    return OrderedDict((name, torch.Size(shape)) for name, shape in shapes.items())


def _random_file_tensor(path: Path, numel: int, seed: int) -> torch.Tensor:
    """A float32 tensor backed by a file (page cache, not process memory), filled with N(0, 0.02)."""
    tensor = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    step = 1 << 26
    for start in range(0, numel, step):
        tensor[start:start + step].normal_(0.0, 0.02, generator=generator)
    return tensor


def inflate(template: Path, run: Path, layers: int) -> None:
    started = time.time()
    _write_run(run, layers)
    tag_dir = run / "checkpoints" / TAG
    tag_dir.mkdir(parents=True, exist_ok=True)
    source = template / "checkpoints" / TAG
    shapes = _full_shapes(layers)
    for rank in range(WORLD):
        model_file = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        states = torch.load(source / model_file, map_location="cpu", weights_only=False)
        states["param_shapes"] = [shapes]
        states["module"] = OrderedDict((name, torch.empty(0)) for name in shapes)
        torch.save(states, tag_dir / model_file)
        optim_file = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        optim = torch.load(source / optim_file, map_location="cpu", weights_only=False)
        sub_group = int(states["ds_config"]["zero_optimization"].get("sub_group_size", 10**9))
        groups, temps = _groups(shapes, sub_group), []
        flat = []
        for index, numel in enumerate(groups):
            temps.append(run / f".rank{rank}_group{index}.tmp")
            flat.append(_random_file_tensor(temps[-1], numel, seed=1000 * rank + index))
        optim["optimizer_state_dict"]["fp32_flat_groups"] = flat
        torch.save(optim, tag_dir / optim_file)
        del flat, optim
        for temp in temps:
            temp.unlink()
        print(f"rank {rank}: {len(groups)} sub-groups, {sum(groups) * 4 / 2**30:.2f} GiB")
    (run / "checkpoints" / "latest").write_text(TAG)
    (tag_dir / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": WORLD}))
    total = sum(s.numel() for s in shapes.values())
    print(f"inflated {run}: {layers} layers, {total / 1e9:.2f}B parameters, in {time.time() - started:.0f} s")


def _groups(shapes, sub_group_size: int):
    """Per-rank flat sub-group sizes: ceil(numel / WORLD) elements of each parameter, in order, a new sub-group
    once one holds sub_group_size elements of a rank's partition (DeepSpeed stage 3's _create_fp16_sub_groups)."""
    groups, current = [], 0
    for shape in shapes.values():
        part = math.ceil(shape.numel() / WORLD)
        current += part
        if current >= sub_group_size:
            groups.append(current)
            current = 0
    if current:
        groups.append(current)
    return groups


def measure(run: Path, out: Path, dtype: str) -> None:
    command = [sys.executable, "-m", "launch.cli", "export", str(run), str(out), "--dtype", dtype]
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    while process.poll() is None:
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.05)
    seconds = time.time() - started
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors")) if out.is_dir() else 0
    report = {"exit": process.returncode, "seconds": round(seconds, 1), "exported_bytes": weights,
              **{f"peak_{k}_gib": round(v / 2**30, 2) for k, v in peaks.items()},
              "peak_rss_over_exported": round(peaks["VmHWM"] / weights, 3) if weights else None,
              "peak_anon_over_exported": round(peaks["RssAnon"] / weights, 3) if weights else None}
    print(json.dumps(report, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("save", "inflate", "measure"))
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    if args.what == "save":
        save(args.paths[0], args.layers)
    elif args.what == "inflate":
        inflate(args.paths[0], args.paths[1], args.layers)
    else:
        measure(args.paths[0], args.paths[1], args.dtype)


if __name__ == "__main__":
    main()
