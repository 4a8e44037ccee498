"""Start from weights trained elsewhere: Hugging Face Llama names, safetensors files, plain DeepSpeed checkpoints.
The one name mapping between Hugging Face and longtrain: `longtrain_name` imports, `hf_name` (its inverse) exports
(`export.py`); Mistral and Qwen2 (with q/k/v `.bias`) use Llama's names.

Why: fine-tuning starts from published weights (HF `model.safetensors`, possibly sharded) or from a checkpoint
another DeepSpeed program wrote; neither uses our parameter names or our per-rank files. Every source is read as
one consolidated fp32 state dict, renamed onto `LlamaModel`, and checked tensor by tensor before anything is
copied, so a wrong model shape is one line naming the tensor, not a traceback from `load_state_dict`. HF's Llama
already stores q/k projections in the rotate-half RoPE layout we use, so no permutation is needed.
"""

import json
import re
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch

from spec.errors import CheckpointError

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
_HF_LAYER = {
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
}
_HF_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "lm_head.weight"}
_HF_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
"""Buffers some HF exports carry; we recompute RoPE tables."""


def is_hf_name(name: str) -> bool:
    return name.startswith("model.")


def longtrain_name(name: str) -> Optional[str]:
    """Our parameter name for a HF Llama name (ours pass through); None for buffers we do not keep."""
    if _IGNORED.match(name):
        return None
    if not is_hf_name(name):
        return _HF_TOP.get(name, name)
    if name in _HF_TOP:
        return _HF_TOP[name]
    match = _HF_LAYER_NAME.match(name)
    if not match or match.group(2) not in _HF_LAYER:
        raise CheckpointError(f"checkpoint tensor {name} is not a Llama parameter longtrain knows (expected "
                              "model.embed_tokens, model.layers.N.self_attn.{q,k,v,o}_proj, model.layers.N.mlp."
                              "{gate,up,down}_proj, *_layernorm, model.norm, lm_head); convert it to Llama names")
    return f"layers.{match.group(1)}.{_HF_LAYER[match.group(2)]}.{match.group(3)}"


def renamed_shapes(shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """Shapes keyed by our names."""
    out = {}
    for name, shape in shapes.items():
        ours = longtrain_name(name)
        if ours is not None:
            out[ours] = tuple(shape)
    return out


def hf_name(ours: str) -> str:
    """The Hugging Face Llama name of one of our parameters (for messages)."""
    top = {v: k for k, v in _HF_TOP.items()}
    if ours in top:
        return top[ours]
    match = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", ours)
    inner = {v: k for k, v in _HF_LAYER.items()}.get(match.group(2)) if match else None
    return f"model.layers.{match.group(1)}.{inner}.{match.group(3)}" if inner else ours


def check_shapes(found: Dict[str, Tuple[int, ...]], expected: Dict[str, Tuple[int, ...]], source: str,
                 tied: bool, hf: bool = False) -> None:
    """One line for the first tensor that is missing, unexpected or of another shape (found: our names)."""
    def label(name):
        return f"{hf_name(name)} (longtrain: {name})" if hf else name

    for name, shape in expected.items():
        if name not in found and not (tied and name == "lm_head.weight"):
            raise CheckpointError(f"{source} has no tensor {label(name)} (shape {list(shape)}); it was written for "
                                  "another model: set the model.* keys to the checkpoint's shape")
        if name in found and tuple(found[name]) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {label(name)} has shape {list(found[name])}, this model "
                                  f"expects {list(shape)}; set the model.* keys (or model.preset) to the "
                                  "checkpoint's shape")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"{source} has tensor {label(extra[0])} that this model does not have "
                              f"({len(extra)} such); set the model.* keys to the checkpoint's shape")


def expected_shapes(model: torch.nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def load_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Copy a (HF- or longtrain-named) state dict into the model after checking every name and shape."""
    renamed = {longtrain_name(k): v for k, v in state.items()}
    renamed.pop(None, None)
    tied = model.lm_head.weight is model.embed.weight
    check_shapes({k: tuple(v.shape) for k, v in renamed.items()}, expected_shapes(model), source, tied,
                 hf=any(is_hf_name(k) for k in state))
    if tied and "lm_head.weight" in renamed and not torch.equal(renamed["lm_head.weight"], renamed["embed.weight"]):
        raise CheckpointError(f"{source} has an lm_head.weight separate from the embedding, this model ties them; "
                              "set model.tie_embeddings=false")
    if tied:
        renamed["lm_head.weight"] = renamed["embed.weight"]
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(renamed[name].to(tensor.dtype))


def safetensors_files(path: Path) -> Iterable[Path]:
    """The .safetensors files of a file, a directory with model.safetensors, or a sharded directory."""
    if path.is_file():
        return [path]
    if (path / HF_INDEX).is_file():
        shards = sorted(set(json.loads((path / HF_INDEX).read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path / HF_INDEX} names shard {path / missing[0]}, which does not exist; "
                                  "download every shard")
        return [path / s for s in shards]
    if (path / HF_SINGLE).is_file():
        return [path / HF_SINGLE]
    raise CheckpointError(f"model.init_from={path}: no {HF_SINGLE} or {HF_INDEX} there; pass a .safetensors file, "
                          "a Hugging Face model directory, or a DeepSpeed checkpoint directory")


def safetensors_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes from the file headers only (cheap: nothing is read into memory)."""
    from safetensors import safe_open

    shapes = {}
    for file in safetensors_files(path):
        with _readable(file), safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in safetensors_files(path):
        with _readable(file):
            state.update(load_file(str(file)))
    return state


class _readable:
    """Turns a safetensors read error into one line naming the file."""

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, kind, error, _trace):
        if error is not None and not isinstance(error, CheckpointError):
            raise CheckpointError(f"{self.file} is not a readable safetensors file ({str(error).splitlines()[0]}); "
                                  "download it again") from error
        return False


def is_safetensors_source(path: Path) -> bool:
    return path.suffix == ".safetensors" or (path / HF_INDEX).is_file() or (path / HF_SINGLE).is_file()


def read_deepspeed_weights(checkpoint_dir: Path, tag: str, trust: bool = False,
                           lazy: bool = False) -> Dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint (ZeRO shards consolidated), with the names it was saved under.
    DeepSpeed's `zero_to_fp32` unpickles in full, so its files pass the restricted unpickler first (unless trust).
    lazy (export): the files are mapped, not read, and ZeRO-3 tensors are DeepSpeed's `GatheredTensor`s, gathered
    one at a time by `.contiguous()` (ZeRO 1-2: views of the partitions concatenated by DeepSpeed)."""
    from orchestrator.checkpoint.pickles import check_files, load_file

    tag_dir = checkpoint_dir / tag
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_files(tag_dir, trust)
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, lazy_mode=lazy))
    states = load_file(tag_dir / "mp_rank_00_model_states.pt", trust, mmap=lazy)
    return {name: t.float() for name, t in states["module"].items()}
