"""Reshape a checkpoint for another world size: DeepSpeed's universal format, converted on the driver.

Why the conversion: DeepSpeed's ZeRO-1/2/3 optimizer shards are cut for the data-parallel size that wrote them and
loading them at another size raises, so when that size differs we run DeepSpeed's own `ds_to_universal` into a new
directory (the source checkpoint is never modified) and the workers load it with `checkpoint.load_universal`.
ZeRO-0 keeps the whole optimizer state on every rank and loads at any size as it is.
"""

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

from orchestrator.checkpoint.inspect import CheckpointInfo
from orchestrator.checkpoint.manager import CheckpointRef
from spec.config import JobConfig
from spec.errors import CheckpointError

UNIVERSAL_DIR = "universal"
"""Inside the run directory: universal copies of the checkpoint the run started from."""


def needs_universal(job: JobConfig, info: Optional[CheckpointInfo]) -> bool:
    return info is not None and info.zero_stage > 0 and info.world_size != job.parallel_dims().zero_world_size


def convert_to_universal(job: JobConfig, placement, info: CheckpointInfo, log=print):
    """Placement whose workers load a universal copy of `info`'s checkpoint, written under RUN_DIR/universal/.

    A copy converted before (its log is written last) is reused; a failed conversion removes what it wrote."""
    out_root = placement.run_dir / UNIVERSAL_DIR
    out_dir, done = out_root / info.tag_dir.name, out_root / f"{info.tag_dir.name}.log"
    universal = replace(placement, initial=CheckpointRef(str(out_root), info.tag_dir.name, universal=True))
    if done.is_file():
        return universal
    log(f"longtrain: {info.tag_dir} was written by {info.world_size} data-parallel ranks, this job has "
        f"{job.parallel_dims().zero_world_size}: converting it to a DeepSpeed universal checkpoint in {out_dir}")
    done.write_text(_ds_to_universal(info, out_root, out_dir))
    return universal


def _ds_to_universal(info: CheckpointInfo, out_root: Path, out_dir: Path) -> str:
    """Run DeepSpeed's converter into out_dir and return its output; on failure remove what it wrote and raise."""
    created = _first_missing(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(info.tag_dir),
               "--output_folder", str(out_dir), "--inject_missing_state", "--num_extract_workers", "2",
               "--num_merge_workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not (out_dir / "zero").is_dir():
        shutil.rmtree(created or out_dir, ignore_errors=True)
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise CheckpointError(f"converting {info.tag_dir} to a universal checkpoint failed "
                              f"({lines[-1] if lines else 'no output'}); resume with "
                              f"cluster.num_workers={info.world_size} instead")
    return result.stdout + result.stderr


def _first_missing(path: Path) -> Optional[Path]:
    """The outermost directory of `path` that does not exist yet (what a failure must remove)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing
