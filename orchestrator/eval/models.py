"""The models `longtrain eval` compares: a run directory (its newest complete checkpoint), RUN_DIR:TAG, or a
Hugging Face directory, loaded with the checkpoint package's own readers (the ones export and init_from use), so
eval sees exactly the weights training wrote."""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from orchestrator.checkpoint.export import run_model, source_model_dir, source_tag
from orchestrator.checkpoint.init_from import load_init_from
from orchestrator.checkpoint.weights import is_safetensors_source, load_weights, read_deepspeed_weights
from spec.config import JobConfig, ModelConfig
from spec.errors import CheckpointError, ConfigError

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class EvalModel:
    label: str
    """How tables and plots name it: RUN_NAME:TAG or the directory's name."""
    config: ModelConfig
    max_length: int
    """The longest context its RoPE setting covers (max_position_embeddings, else the length it was trained at)."""
    tokenizer_file: Optional[Path]
    """The model's tokenizer.json; None: byte tokens (the bundled corpus model)."""
    spec: str
    default_length: int
    """eval.length when unset: the length a run trained at; data.seq_len (within max_length) for a HF directory."""

    def build(self, device: torch.device, dtype: torch.dtype, attention_kernel: str = "sdpa") -> torch.nn.Module:
        """The model with its weights, in eval mode (built only when it is evaluated: one in memory at a time), its
        attention through train.attention_kernel (a kernel that cannot run here refused before the weights load)."""
        from orchestrator import attention
        from orchestrator.model import LlamaModel

        model = LlamaModel(self.config)
        attention.install(model, attention_kernel, False, device, dtype)
        _load(model, self.spec)
        return model.to(device=device, dtype=dtype).eval()


def resolve_models(specs: Sequence[str], job: JobConfig) -> List[EvalModel]:
    """Every MODEL argument checked (and its shape read) before any is loaded, so a typo in the third fails
    before the first one's minutes of evaluation."""
    return [resolve_model(spec, job) for spec in specs]


def resolve_model(spec: str, job: JobConfig) -> EvalModel:
    path = Path(spec.partition(":")[0])
    if is_hf_dir(Path(spec)):
        return _hf_model(spec, job)
    if not path.exists():
        raise ConfigError(f"eval: {path} does not exist; pass a run directory, RUN_DIR:TAG or a Hugging Face "
                          "model directory")
    try:
        run_dir, checkpoint_dir, tag = source_tag(spec)
    except CheckpointError as error:  # the export's checks, worded for this command
        raise CheckpointError(str(error).replace("export: ", "eval: ", 1).replace(
            "and export again", "and evaluate again").replace("pass RUN_DIR[:TAG]",
                                                              "pass RUN_DIR[:TAG] or a Hugging Face directory")) from None
    model, seq_len = run_model(run_dir)
    if model.lora.enabled:
        raise CheckpointError(f"eval: {run_dir} trained LoRA adapters, whose checkpoint holds no base weights "
                              "(merging is not built); evaluate the base model directory instead")
    source = source_model_dir(model.init_from)
    tokenizer = source / TOKENIZER_FILE if source is not None and (source / TOKENIZER_FILE).is_file() else None
    model.init_from = None
    return EvalModel(f"{run_dir.name}:{tag}", model, model.max_position_embeddings or seq_len, tokenizer,
                     f"{checkpoint_dir}:{tag}", seq_len)


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and is_safetensors_source(path)


def _hf_model(spec: str, job: JobConfig) -> EvalModel:
    """The shape from config.json, through the job config's own Hugging Face layer (spec.config.hf)."""
    from spec.config.hf import hf_layer
    from omegaconf import OmegaConf

    path = Path(spec)
    fields = hf_layer({}, {"init_from": str(path)}, f"eval model {path}")
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), fields,
                                                {"init_from": str(path)}))
    tokenizer = path / TOKENIZER_FILE if (path / TOKENIZER_FILE).is_file() else None
    covered = model.max_position_embeddings or job.data.seq_len
    return EvalModel(path.name, model, covered, tokenizer, str(path), min(covered, job.data.seq_len))


def _load(model: torch.nn.Module, spec: str) -> None:
    path = Path(spec)
    if is_hf_dir(path):
        load_init_from(model, spec)
        return
    checkpoint_dir, _, tag = spec.rpartition(":")
    load_weights(model, read_deepspeed_weights(Path(checkpoint_dir), tag), f"eval model {spec}")
