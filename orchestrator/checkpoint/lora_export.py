"""`longtrain export` of a LoRA run (`--lora adapter|merged`): a peft adapter directory, or the base model with the
adapters merged in, as a Hugging Face model directory. Built on `export.py`'s checks and writers.

Why two forms: an adapter directory (`adapter_config.json` + `adapter_model.safetensors`, peft's own format and
names) is megabytes and loads onto the base with `PeftModel.from_pretrained`; a merged directory (W + alpha/r B A
for every adapted projection) serves anywhere a plain model does. A LoRA checkpoint holds only the adapters
(`orchestrator.lora`), so the merged form reads the base from `model.init_from` again, after checking its sha256
against the one the checkpoint recorded; a run on random base weights exports its adapters only.
"""

import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from orchestrator.checkpoint import export
from orchestrator.checkpoint.inspect import inspect_checkpoint
from orchestrator.checkpoint.pickles import load_file
from orchestrator.checkpoint.weights import check_shapes, hf_name, read_deepspeed_weights
from orchestrator.lora import adapter_shapes, base_record, check_base, peft_config
from spec.config import ModelConfig
from spec.errors import CheckpointError

LORA_FORMS = ("adapter", "merged")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_lora(run_dir: Path, checkpoint_dir: Path, tag: str, model: ModelConfig, seq_len: int, out_dir: str,
                dtype: str, overwrite: bool, form: str, max_shard_bytes: int) -> "export.ExportResult":
    started = time.time()
    if form not in LORA_FORMS:
        raise CheckpointError(f"export: --lora {form} must be one of {', '.join(LORA_FORMS)}")
    source = export.source_model_dir(model.init_from)
    out = export.target_dir(Path(out_dir), overwrite, [run_dir] + ([source] if source else []))
    info = inspect_checkpoint(checkpoint_dir, tag)
    with export._quiet():
        adapters = read_deepspeed_weights(checkpoint_dir, tag)
    check_shapes({k: tuple(v.shape) for k, v in adapters.items()}, adapter_shapes(model), f"checkpoint {info.tag_dir}",
                 model.tie_embeddings)
    base = _checked_base(model, info.tag_dir, form)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if form == "adapter":
            shards, total, copied = 1, _write_adapter(temp, adapters, model, source, export.DTYPES[dtype][0]), []
        else:
            weights = merged_weights(base, adapters, model)
            shards, total = export.write_shards(weights, export.hf_names(model), temp, export.DTYPES[dtype][0],
                                                max_shard_bytes)
            copied = export.write_metadata(temp, model, seq_len, export.DTYPES[dtype][1], source)
        export.replace_dir(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return export.ExportResult(out, info.tag_dir, info.zero_stage, info.world_size, model.architecture, shards, total,
                               time.time() - started, copied, source, form=f"lora {form}")


def _checked_base(model: ModelConfig, tag_dir: Path, form: str) -> Optional[Dict[str, torch.Tensor]]:
    """The base weights (our names, fp32) for a merged export, after checking they are the run's base."""
    saved = _recorded_base(tag_dir)
    if form == "adapter":
        return None
    if not model.init_from:
        raise CheckpointError(f"export: {tag_dir} trained adapters on random base weights (seed "
                              f"{(saved or {}).get('random_seed')}), which no file holds; export --lora adapter")
    check_base(saved, base_record(model, int((saved or {}).get("random_seed") or 0)), str(tag_dir))
    from orchestrator.build import init_from_tensors

    return {name: tensor.float() for name, tensor in init_from_tensors(model.init_from, False)}


def _recorded_base(tag_dir: Path) -> Optional[dict]:
    states = sorted(tag_dir.glob("*model_states.pt"))
    return load_file(states[0], trust=False).get("lora_base") if states else None


def merged_weights(base: Dict[str, torch.Tensor], adapters: Dict[str, torch.Tensor],
                   model: ModelConfig) -> Dict[str, torch.Tensor]:
    """W + (alpha / r) B A for every adapted projection (fp32), the others as they are."""
    scale = model.lora.alpha / model.lora.rank
    merged = dict(base)
    for name, a in adapters.items():
        if ".lora_A." not in name:
            continue
        projection = name.split(".lora_A.")[0]
        b = adapters[name.replace(".lora_A.", ".lora_B.")]
        merged[projection + ".weight"] = base[projection + ".weight"].float() + scale * (b.float() @ a.float())
    return merged


def peft_name(ours: str) -> str:
    """layers.0.attn.q_proj.lora_A.default.weight -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    (peft's saved names: Hugging Face's module path, no adapter name)."""
    projection, rest = ours.split(".lora_", 1)
    kind = rest.split(".")[0]
    return f"base_model.model.{hf_name(projection + '.weight')[:-len('.weight')]}.lora_{kind}.weight"


def _write_adapter(out: Path, adapters: Dict[str, torch.Tensor], model: ModelConfig, source: Optional[Path],
                   dtype: torch.dtype) -> int:
    from safetensors.torch import save_file

    tensors = {peft_name(name): tensor.to(dtype).contiguous() for name, tensor in adapters.items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_config(model.lora)
    config.task_type = "CAUSAL_LM"
    config.base_model_name_or_path = str(source) if source else None
    config.save_pretrained(str(out))
    return sum(t.numel() * t.element_size() for t in tensors.values())
