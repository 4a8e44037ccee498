"""`model.init_from`: the weights a fresh run starts from (fine-tuning), instead of a random initialisation.

Why separate from resume: resuming restores a whole training state (optimizer, schedule, step, data position)
and needs our parameter names; starting from weights needs only tensors, so it accepts what others publish:
Hugging Face Llama safetensors (one file or sharded) and DeepSpeed checkpoints of any ZeRO stage, with our names or
Hugging Face's. The driver checks names and shapes from file headers before workers start (and that DeepSpeed files
need no code to load, pickles.py); each worker then loads the weights into its model before DeepSpeed partitions it.
"""

from pathlib import Path
from typing import Dict, Tuple

import torch

from orchestrator.checkpoint.inspect import inspect_checkpoint, resolve_tag
from orchestrator.checkpoint.weights import (check_shapes, expected_shapes, is_hf_name, is_safetensors_source,
                                             load_weights, read_deepspeed_weights, read_safetensors, renamed_shapes,
                                             safetensors_shapes)
from spec.config import ModelConfig


def check_init_from(config: ModelConfig, trust: bool = False) -> None:
    """Refuse, in one line, weights that are missing, unreadable, of another shape or holding Python objects that
    could run code (unless trust: checkpoint.trust_pickles) (driver side, cheap)."""
    if not config.init_from:
        return
    found, hf, source = _source_shapes(config.init_from, trust)
    check_shapes(found, model_shapes(config), source, config.tie_embeddings, hf)


def load_init_from(model: torch.nn.Module, spec: str, trust: bool = False) -> None:
    path, tag = _split(spec)
    if is_safetensors_source(path):
        load_weights(model, read_safetensors(path), f"model.init_from={spec}")
        return
    checkpoint_dir, tag = resolve_tag(path, tag, f"model.init_from={spec}")
    load_weights(model, read_deepspeed_weights(checkpoint_dir, tag, trust), f"model.init_from={spec}")


def model_shapes(config: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Our parameter shapes without allocating the model."""
    from orchestrator.model import LlamaModel

    with torch.device("meta"):
        return expected_shapes(LlamaModel(config))


def _source_shapes(spec: str, trust: bool):
    path, tag = _split(spec)
    if is_safetensors_source(path):
        shapes = safetensors_shapes(path)
        return renamed_shapes(shapes), any(is_hf_name(n) for n in shapes), f"model.init_from={spec}"
    checkpoint_dir, tag = resolve_tag(path, tag, f"model.init_from={spec}")
    info = inspect_checkpoint(checkpoint_dir, tag, trust)
    return info.shapes, info.hf_names, f"model.init_from={spec} ({info.tag_dir})"


def _split(spec: str) -> Tuple[Path, str]:
    path, _, tag = spec.partition(":")
    return Path(path), tag
