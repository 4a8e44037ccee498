"""`longtrain export`: a run's checkpoint as a Hugging Face model directory, to serve and evaluate elsewhere.

Why: a model trained or extended here must leave in the format everyone else loads. The directory holds
`config.json` (the run's architecture, shape and RoPE, any context extension included: spec.config.hf),
`model-0000N-of-0000M.safetensors` shards of up to 5 GB with `model.safetensors.index.json`, the source model's
tokenizer files and `generation_config.json`. Weights are consolidated by DeepSpeed's own `zero_to_fp32` (any
ZeRO stage) and renamed with the inverse of the import mapping (`weights.hf_name`), so one mapping serves both ways.

Memory: DeepSpeed's lazy mode maps the checkpoint files instead of reading them, and under ZeRO-3 gathers each
tensor from the ranks' partitions only when its shard is written; a shard is written and dropped before the next
is gathered. The host memory the export needs is about one output shard plus the largest tensor in fp32, not the
model (ZeRO 1-2: DeepSpeed first concatenates the ranks' fp32 partitions into one vector, so the model in fp32).

Safety: every input is checked before anything is written (run directory, complete tag, checksums, files readable
without running code, shapes, OUT_DIR); the directory is written under a temporary name beside OUT_DIR and renamed
at the end, so a failed export leaves nothing; an existing OUT_DIR is replaced only with `overwrite`, and only if it
is a model directory (a config.json) that holds neither the run nor the source model.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.checkpoint.init_from import model_shapes
from orchestrator.checkpoint.inspect import inspect_checkpoint
from orchestrator.checkpoint.manager import COMPLETE_MARKER, complete_tags
from orchestrator.checkpoint.resume import verify_checksums
from orchestrator.checkpoint.weights import (HF_INDEX, check_shapes, hf_name, is_hf_name, longtrain_name,
                                             read_deepspeed_weights)
from spec.config import ModelConfig
from spec.config.hf import CONFIG_FILE, export_config, read_config
from spec.errors import CheckpointError
from spec.yamlio import read_yaml

MAX_SHARD_BYTES = 5 * 10**9
"""Hugging Face's default shard size ("5GB")."""
DTYPES = {"bf16": (torch.bfloat16, "bfloat16"), "fp32": (torch.float32, "float32")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"


@dataclass
class ExportResult:
    out_dir: Path
    tag_dir: Path
    zero_stage: int
    world_size: int
    architecture: str
    shards: int
    total_bytes: int
    seconds: float
    copied: List[str] = field(default_factory=list)
    """Files copied from the source model (tokenizer, generation config)."""
    source: Optional[Path] = None
    form: str = "model"
    """model, or for a LoRA run "lora adapter" (a peft adapter directory) or "lora merged" (`lora_export`)."""


def export_run(spec: str, out_dir: str, dtype: str = "bf16", overwrite: bool = False,
               max_shard_bytes: int = MAX_SHARD_BYTES, lora: str = "adapter") -> ExportResult:
    """Write RUN_DIR[:TAG]'s weights (default: its newest complete checkpoint) as a Hugging Face directory; a LoRA
    run's as a peft adapter directory or merged into its base (`lora`: adapter or merged, `lora_export`)."""
    started = time.time()
    if dtype not in DTYPES:
        raise CheckpointError(f"export: --dtype {dtype} must be one of {', '.join(DTYPES)}")
    run_dir, checkpoint_dir, tag = source_tag(spec)
    model, seq_len = run_model(run_dir)
    if model.lora.enabled:
        from orchestrator.checkpoint.lora_export import export_lora

        return export_lora(run_dir, checkpoint_dir, tag, model, seq_len, out_dir, dtype, overwrite, lora,
                           max_shard_bytes)
    source = source_model_dir(model.init_from)
    out = target_dir(Path(out_dir), overwrite, [run_dir] + ([source] if source else []))
    info = inspect_checkpoint(checkpoint_dir, tag)
    with _quiet():  # zero_to_fp32 prints its progress on stdout and stderr
        weights = read_deepspeed_weights(checkpoint_dir, tag, lazy=True)
    check_shapes({k: tuple(v.shape) for k, v in weights.items()}, model_shapes(model), f"checkpoint {info.tag_dir}",
                 model.tie_embeddings)
    names = hf_names(model)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(temp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the model private to this user
    try:
        shards, total = write_shards(weights, names, temp, DTYPES[dtype][0], max_shard_bytes)
        copied = write_metadata(temp, model, seq_len, DTYPES[dtype][1], source)
        replace_dir(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return ExportResult(out, info.tag_dir, info.zero_stage, info.world_size, model.architecture, shards, total,
                        time.time() - started, copied, source)


def source_tag(spec: str) -> Tuple[Path, Path, str]:
    """(run dir, its checkpoints dir, a complete tag whose checksums match) for RUN_DIR[:TAG]."""
    path_text, _, tag = spec.partition(":")
    run_dir = Path(path_text)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"export: {run_dir} is not a longtrain run directory (no config.yaml in it); pass "
                              "RUN_DIR[:TAG] of a `longtrain train` run")
    checkpoint_dir = run_dir / "checkpoints"
    tags = complete_tags(checkpoint_dir, warn=False)
    if not tag and not tags:
        raise CheckpointError(f"export: {checkpoint_dir} holds no complete checkpoint; train with "
                              "checkpoint.at_end=true (the default) and export again")
    tag = tag or tags[-1]
    if tag not in tags:
        state = (f"is incomplete (no {COMPLETE_MARKER} marker)" if (checkpoint_dir / tag).is_dir()
                 else "does not exist")
        raise CheckpointError(f"export: checkpoint {checkpoint_dir / tag} {state}; complete tags there: "
                              f"{', '.join(tags) or 'none'}")
    verify_checksums(checkpoint_dir / tag)
    return run_dir, checkpoint_dir, tag


def run_model(run_dir: Path) -> Tuple[ModelConfig, int]:
    """The run's model section and sequence length, from the resolved config.yaml it wrote."""
    saved = read_yaml(run_dir / "config.yaml", "run config", CheckpointError, "restore it from the run") or {}
    try:
        model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved.get("model") or {}))
    except (OmegaConfBaseException, TypeError, ValueError) as error:
        raise CheckpointError(f"export: {run_dir / 'config.yaml'} has a model section this longtrain cannot read "
                              f"({str(error).splitlines()[0]}); export with the longtrain that trained it") from error
    return model, int((saved.get("data") or {}).get("seq_len") or 0)


def source_model_dir(init_from: Optional[str]) -> Optional[Path]:
    """The Hugging Face directory the run started from (tokenizer, config.json), if it is still there."""
    if not init_from:
        return None
    path = Path(init_from)
    path = path.parent if path.suffix == ".safetensors" else path
    return path if path.is_dir() and (path / CONFIG_FILE).is_file() else None


def target_dir(out: Path, overwrite: bool, protected: List[Path]) -> Path:
    """OUT_DIR, checked: absent, or with overwrite a model directory holding none of `protected`."""
    out = out.absolute()
    if not out.parent.is_dir():
        raise CheckpointError(f"export: {out.parent} does not exist; create it or choose another OUT_DIR")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"export: cannot write into {out.parent} (permission denied); choose another OUT_DIR")
    for kept in protected:
        kept = kept.resolve()
        if out.resolve() == kept or out.resolve() in kept.parents:
            raise CheckpointError(f"export: OUT_DIR {out} holds {kept}, which the export reads; choose another "
                                  "OUT_DIR")
    if not out.exists() and not out.is_symlink():
        return out
    if not overwrite:
        raise CheckpointError(f"export: {out} exists; pass --overwrite to replace it, or choose another OUT_DIR")
    if not out.is_dir() or out.is_symlink():
        raise CheckpointError(f"export: {out} is not a directory; remove it or choose another OUT_DIR")
    if any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise CheckpointError(f"export: {out} is not a model directory (no {CONFIG_FILE}), so --overwrite does not "
                              "replace it; choose another OUT_DIR")
    return out


def hf_names(model: ModelConfig) -> List[Tuple[str, str]]:
    """(our name, Hugging Face name) of every tensor the export writes, in the model's order (no lm_head when the
    embeddings are tied: Hugging Face ties them from tie_word_embeddings)."""
    pairs = []
    for ours in model_shapes(model):
        if ours == "lm_head.weight" and model.tie_embeddings:
            continue
        theirs = hf_name(ours)
        if not (is_hf_name(theirs) or theirs == "lm_head.weight") or longtrain_name(theirs) != ours:
            raise CheckpointError(f"export: parameter {ours} has no Hugging Face name; this model cannot be exported")
        pairs.append((ours, theirs))
    return pairs


def write_shards(weights: Dict[str, Any], names: List[Tuple[str, str]], out: Path, dtype: torch.dtype,
                 max_shard_bytes: int) -> Tuple[int, int]:
    """Safetensors shards of up to max_shard_bytes and their index; (shards, bytes). One shard's tensors are in
    memory at a time."""
    from safetensors.torch import save_file

    element = torch.empty((), dtype=dtype).element_size()
    sizes = {ours: weights[ours].shape.numel() * element for ours, _ in names}
    shards = plan_shards(names, sizes, max_shard_bytes)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for ours, theirs in shard:
            tensors[theirs] = _materialize(weights[ours], dtype)
            release_pages(weights[ours])
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        os.chmod(out / file, 0o666 & ~_umask())  # safetensors creates it 0600
        del tensors
        weight_map.update({theirs: file for _, theirs in shard})
    total = sum(sizes.values())
    _write_json(out / HF_INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return len(shards), total


def plan_shards(names: List[Tuple[str, str]], sizes: Dict[str, int], max_bytes: int) -> List[List[Tuple[str, str]]]:
    """Consecutive tensors packed into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: List[List[Tuple[str, str]]] = [[]]
    filled = 0
    for pair in names:
        size = sizes[pair[0]]
        if shards[-1] and filled + size > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(pair)
        filled += size
    return shards


def _materialize(tensor: Any, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of its own in the export dtype: DeepSpeed's GatheredTensor gathered now; a view of DeepSpeed's
    concatenated partitions or of a mapped file copied (safetensors refuses tensors that share memory)."""
    if isinstance(tensor, torch.Tensor):
        return tensor.to(dtype=dtype, copy=True)
    return tensor.contiguous().to(dtype)


def release_pages(tensor: Any) -> None:
    """Hand back the checkpoint pages a gathered tensor was read from. DeepSpeed maps the ZeRO-3 partitions (and the
    ZeRO-0 states) from the files; read pages would stay in this process's resident memory, the whole fp32
    checkpoint by the last shard, though the kernel could drop them. madvise(MADV_DONTNEED) drops them now; a later
    read of the same page (a neighbouring tensor) maps it again from the file. Only ranges inside a file mapping are
    touched (on anonymous memory the call would zero them: ZeRO 1-2's concatenated partitions); Linux only."""
    sources = [g for rank in tensor.flat_groups for g in rank] if hasattr(tensor, "flat_groups") else [tensor]
    for source in sources:
        if isinstance(source, torch.Tensor) and source.numel():
            _drop_file_pages(source.data_ptr(), source.numel() * source.element_size())


def _drop_file_pages(address: int, length: int) -> None:
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start, end = address // page * page, -(-(address + length) // page) * page
    if not sys.platform.startswith("linux") or not _inside_file_mapping(start, end):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


def _inside_file_mapping(start: int, end: int) -> bool:
    """[start, end) lies within one mapping of this process that maps a file (/proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= start and end <= high:
            return len(fields) == 6 and fields[4] != "0" and not fields[5].startswith("[")
    return False


def write_metadata(out: Path, model: ModelConfig, seq_len: int, dtype_name: str,
                   source: Optional[Path]) -> List[str]:
    """config.json, generation_config.json and the source model's tokenizer files; the names copied."""
    source_config = read_config(source / CONFIG_FILE) if source else None
    _write_json(out / CONFIG_FILE, export_config(model, seq_len, dtype_name, source_config))
    copied = []
    for name in TOKENIZER_FILES + (GENERATION_CONFIG,):
        if source and (source / name).is_file():
            shutil.copy2(source / name, out / name)
            copied.append(name)
    if GENERATION_CONFIG not in copied:
        ids = {k: source_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if source_config and source_config.get(k) is not None}
        _write_json(out / GENERATION_CONFIG, {"_from_model_config": True, **ids})
    return copied


def replace_dir(temp: Path, out: Path) -> None:
    """temp becomes out; a replaced out is renamed aside first and removed after."""
    aside = None
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        os.replace(out, aside / out.name)
    os.replace(temp, out)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, content: Dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


@contextmanager
def _quiet() -> Iterator[None]:
    """DeepSpeed's prints and progress bars silenced (file descriptors 1 and 2), restored on the way out."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
