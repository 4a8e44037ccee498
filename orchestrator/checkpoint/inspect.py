"""Look at a DeepSpeed checkpoint before any worker starts: files present and whole, who wrote it, what it holds.

Why: DeepSpeed reports a missing `latest` as a warning and `(None, None)`, a missing ZeRO shard as a bare
FileNotFoundError on one rank, and a truncated file as a zip error deep in `torch.load`, each after the workers
have started and written logs into the run directory. Here the driver checks the tag directory first and says, in
one line, which file is wrong and what to do. Nothing is unpickled as code: torch files are zip archives (a
truncated one has no central directory), every one of them must pass the restricted unpickler (pickles.py) unless
the user trusts the source, and DeepSpeed's model-states file then gives the data-parallel size that wrote it, the
ZeRO stage, and the parameter names and shapes.
"""

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple

import torch

from orchestrator.checkpoint.pickles import check_files, load_file
from orchestrator.checkpoint.weights import is_hf_name, renamed_shapes
from spec.errors import CheckpointError

_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_(optim|model)_states\.pt$")


@dataclass
class CheckpointInfo:
    tag_dir: Path
    world_size: int
    """Data-parallel size that wrote it (DeepSpeed's dp_world_size)."""
    zero_stage: int
    hf_names: bool
    """Parameters are named as Hugging Face's Llama (model.layers.N...), not as longtrain's model."""
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    """Parameter shapes under longtrain's names."""


def inspect_checkpoint(checkpoint_dir: Path, tag: str, trust: bool = False) -> CheckpointInfo:
    """trust: checkpoint.trust_pickles (files that need a full unpickle are read, not refused)."""
    tag_dir = Path(checkpoint_dir) / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {tag_dir} does not exist; list the tags in {checkpoint_dir} and pass "
                              "resume=DIR:TAG")
    for file in sorted(tag_dir.glob("*.pt")):
        check_torch_file(file)
    check_files(tag_dir, trust)
    states_file = _model_states_file(tag_dir)
    states = _load_states(states_file, trust)
    stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    world = int(states.get("dp_world_size") or 1)
    if stage > 0:
        _check_shards(tag_dir, world, "optim")
    if stage == 3:
        _check_shards(tag_dir, world, "model")
    shapes = _parameter_shapes(states)
    return CheckpointInfo(tag_dir, world, stage, any(is_hf_name(n) for n in shapes), renamed_shapes(shapes))


def check_torch_file(file: Path) -> None:
    """A torch.save file must be a whole zip archive."""
    try:
        with zipfile.ZipFile(file) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"checkpoint file {file} is truncated or corrupt ({error}); resume from an earlier "
                              "tag with resume=DIR:TAG, or restore the file from a copy") from error


def _model_states_file(tag_dir: Path) -> Path:
    plain = tag_dir / "mp_rank_00_model_states.pt"
    if plain.is_file():
        return plain
    zero3 = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if zero3.is_file():
        return zero3
    raise CheckpointError(f"{tag_dir} is not a DeepSpeed checkpoint: expected {plain.name} (ZeRO 0-2) or "
                          f"{zero3.name} (ZeRO-3) in it; pass the directory that holds the tag and `latest`, "
                          "or DIR:TAG")


def _load_states(file: Path, trust: bool) -> dict:
    try:
        return load_file(file, trust, mmap=True, real=False)
    except CheckpointError:
        raise
    except Exception as error:  # any unreadable state is the user's file problem
        raise CheckpointError(f"checkpoint file {file} cannot be read as DeepSpeed model states "
                              f"({str(error).splitlines()[0]}); resume from another tag") from error


def _check_shards(tag_dir: Path, world: int, kind: str) -> None:
    ranks = {int(m.group(1)): name for name in (p.name for p in tag_dir.iterdir())
             if (m := _SHARD.match(name)) and m.group(2) == kind}
    prefix = next(iter(ranks.values()), f"zero_pp_rank_0_mp_rank_00_{kind}_states.pt").split("zero_pp_rank_")[0]
    for rank in range(world):
        if rank not in ranks:
            missing = tag_dir / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
            raise CheckpointError(f"checkpoint shard {missing} is missing (the checkpoint was written by {world} "
                                  f"data-parallel rank(s), {len(ranks)} {kind} shard(s) are there); restore it or "
                                  "resume from an earlier tag")


def _parameter_shapes(states: dict) -> Dict[str, Tuple[int, ...]]:
    groups = states.get("param_shapes")
    if groups:
        return {name: tuple(shape) for group in groups for name, shape in group.items()}
    return {name: tuple(t.shape) for name, t in (states.get("module") or {}).items()}


def resolve_tag(path: Path, tag: str, what: str) -> Tuple[Path, str]:
    """(checkpoint dir, tag) for DIR, DIR:TAG or a tag directory itself; `what` names the key in messages."""
    if path.is_file():
        raise CheckpointError(f"{what}: {path} is a file, not a DeepSpeed checkpoint directory; pass the directory "
                              "that holds `latest` (or DIR:TAG); to start from weights files use model.init_from")
    if not path.is_dir():
        raise CheckpointError(f"{what}: {path} does not exist; pass a run directory, a DeepSpeed checkpoint "
                              "directory, or DIR:TAG")
    if tag:
        if not (path / tag).is_dir():
            tags = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise CheckpointError(f"{what}: tag {tag} not found in {path}; tags there: {', '.join(tags) or 'none'}")
        return path, tag
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if any(path.glob("*model_states.pt")):
        return path.parent, path.name
    tags = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*model_states.pt")))
    hint = f"tags there: {', '.join(tags)}; name one with DIR:TAG" if tags else "it holds no DeepSpeed tag either"
    raise CheckpointError(f"{what}: {path / 'latest'} is missing (DeepSpeed writes it to name the newest tag); "
                          f"{hint}")
