"""The ALST recipe's loss: DeepSpeed's `TiledFusedLogitsLoss` (`deepspeed.runtime.sequence_parallel.ulysses_sp`,
DeepSpeed 0.19.8; Bekman et al., arXiv 2506.13996) in place of longtrain's segmented loss (`orchestrator.loss`).

Both cut the tokens into chunks so the tokens x vocab logits never exist. DeepSpeed's runs each chunk's LM head and
cross-entropy forward and backward at once inside the loss's forward (the chunk's logits are made once), keeps
the hidden states' gradient, and hands it back in backward; ours recomputes each chunk's logits in backward. The
cross-entropy is the one Hugging Face's causal-LM loss computes (fp32 logits, summed, divided by the predicted
tokens). Used only by `train.activation_checkpointing=alst`, the baseline; chunks of `LOSS_CHUNK_TOKENS` tokens,
as ours, so the two recipes differ in how, not in how much.
"""

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from orchestrator.loss import IGNORE_INDEX
from spec.activations import LOSS_CHUNK_TOKENS


@dataclass
class Config:
    chunk_tokens: int = LOSS_CHUNK_TOKENS


def tiled_fused_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                     chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `targets` through DeepSpeed's TiledFusedLogitsLoss."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    predicted = (targets != IGNORE_INDEX).sum().clamp(min=1)
    shards = max(1, min(targets.numel(), math.ceil(targets.numel() / chunk_tokens)))

    def chunk_loss(lm_head, rows, labels):
        logits = lm_head(rows).float()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / predicted

    trainable = [p for p in head.parameters() if p.requires_grad]
    return TiledFusedLogitsLoss.apply(chunk_loss, head, hidden, targets, None, shards, trainable, "sum")


def apply(model, config: Config, layers: Iterable[int] = ()) -> None:
    """The model's loss becomes DeepSpeed's tiled one (`layers` is unused: the loss is the model's, not a layer's)."""
    model.loss_function = lambda hidden, head, targets: tiled_fused_loss(hidden, head, targets, config.chunk_tokens)
