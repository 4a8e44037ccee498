"""LoRA fine-tuning through peft (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv
2106.09685): the base weights stay frozen and each targeted projection learns W + (alpha / r) B A.

Why peft and its low-level `inject_adapter_in_model`: peft is the ecosystem's implementation (an adapter
directory it writes loads in any peft program), and injection wraps the named projections of our own model in
place, with no `PeftModel` around it, so DeepSpeed, the memory techniques and the checkpoint code see the same
module tree with `base_layer`, `lora_A` and `lora_B` inserted under each projection; it also freezes everything
but the adapters (embeddings, norms and the LM head included).

One adjustment: each adapter's `lora_A` (a plain `nn.Linear` in peft) is replaced by our `Linear` holding the same
weight. The frozen base saves no input for backward (no weight gradient); `lora_A` saves the projection's input
for its own weight gradient, so that is where the compression slot that keeps a compact input must be
(`orchestrator.model.input_linears`). The token-wise runtime needs nothing: `lora_A` saves the very tensor the
layer tags (peft's dropout is the identity at 0 and casts nothing when the adapters share the base's dtype), so
it is kept, swapped or recomputed like the plain model's linear inputs; `lora_B`'s input (rank wide) stays
whole on the GPU, and the planner counts it.

The base's provenance (`base_record`) goes into every checkpoint: only the adapters are saved, so a resume must
rebuild the same base, and is refused in one line when the base it would build differs.
"""

import hashlib
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from orchestrator.model import Linear
from spec.config.schema import LoraConfig, ModelConfig
from spec.errors import CheckpointError

ADAPTER = "default"
"""peft's adapter name: the one adapter longtrain trains."""


def peft_config(config: LoraConfig):
    """The peft `LoraConfig` of our section (biases stay frozen, as in the LoRA paper)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=list(config.target_modules), bias="none")


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap the targeted projections with peft's LoRA adapters in place and freeze the rest; returns the model."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(peft_config(config), model, adapter_name=ADAPTER)
    for module in list(model.modules()):
        adapters = getattr(module, "lora_A", None)
        if isinstance(adapters, nn.ModuleDict) and ADAPTER in adapters:
            adapters[ADAPTER] = _our_linear(adapters[ADAPTER])
    return model


def _our_linear(plain: nn.Linear) -> Linear:
    """Our `Linear` (with the compact-input slot) holding `plain`'s parameters themselves."""
    with torch.device("meta"):
        ours = Linear(plain.in_features, plain.out_features, bias=plain.bias is not None)
    ours.weight = plain.weight
    if plain.bias is not None:
        ours.bias = plain.bias
    return ours


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """What the optimizer gets: every parameter that requires a gradient (the adapters only under LoRA)."""
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter weights under peft's own names (`base_model.model.` prefix added by the export that writes a
    peft directory)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def base_record(model_config: ModelConfig, seed: int) -> Dict[str, Optional[str]]:
    """Where the frozen base comes from: `model.init_from` and the sha256 of its files, or the seed of a randomly
    initialised base (which the same seed and shape rebuild exactly)."""
    source = model_config.init_from
    if not source:
        return {"init_from": None, "sha256": None, "random_seed": str(seed)}
    return {"init_from": source, "sha256": weights_sha256(source), "random_seed": None}


def weights_sha256(source: str) -> str:
    """sha256 over the weight files of `model.init_from` (a file, a directory's safetensors and .pt files, or a
    DeepSpeed DIR:TAG), in name order, read in 16 MiB blocks."""
    path = Path(source.split(":")[0] if ":" in source and not Path(source).exists() else source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".pt",
                                                                                          ".bin"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(16 * 2**20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_base(saved: Optional[Dict[str, Optional[str]]], current: Dict[str, Optional[str]], where: str) -> None:
    """Refuse to resume adapters on another base than the one they were trained on (one line)."""
    if saved is None or saved == current:
        return
    raise CheckpointError(f"the LoRA checkpoint {where} was trained on base {_describe(saved)}, this run builds "
                          f"{_describe(current)}; set model.init_from (and train.seed) to the checkpoint's base")


def _describe(record: Dict[str, Optional[str]]) -> str:
    if record.get("init_from"):
        return f"{record['init_from']} (sha256 {str(record.get('sha256'))[:12]})"
    return f"random weights of seed {record.get('random_seed')}"


def client_state(module: nn.Module) -> Dict[str, Dict[str, Optional[str]]]:
    """What a checkpoint of this model carries about its base (DeepSpeed's client state; empty without LoRA)."""
    record = getattr(module, "lora_base", None)
    return {"lora_base": record} if record is not None else {}


def check_resumed(state: Dict, model: nn.Module, where: str) -> None:
    """After a resume: the checkpoint's base is the one this run built (checkpoints without LoRA pass)."""
    current = getattr(model, "lora_base", None)
    if current is not None:
        check_base(state.get("lora_base"), current, where)


def adapter_shapes(model_config: ModelConfig) -> Dict[str, tuple]:
    """The adapters' names and shapes, what a LoRA checkpoint holds (built on the meta device: nothing allocated)."""
    from orchestrator.model import LlamaModel

    with torch.device("meta"):
        model = apply_lora(LlamaModel(model_config), model_config.lora)
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
