"""Perplexity by position: the mean next-token loss in log-spaced position buckets (0-1K, 1K-2K, 2K-4K, ...) over
held-out sequences. A model that uses its long context keeps lowering the loss in the late buckets; one that does
not flattens (or rises past the length it was trained at), which training loss, dominated by short-range
prediction, cannot show."""

from dataclasses import dataclass
from typing import Iterable, List

import torch
import torch.nn.functional as F

from orchestrator.eval.forward import hidden_states

LOSS_CHUNK = 4096
"""Tokens whose logits exist at once: a 128K-vocabulary model's logits for 1M tokens would be 512 GB in fp32."""


@dataclass
class Bucket:
    start: int
    end: int
    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.loss).exp())


def bucket_edges(length: int, first: int = 0) -> List[int]:
    """[0, first, 2 first, 4 first, ..., length]; first=0: length / 32 rounded down to a power of two (at least 1)."""
    if first <= 0:
        first = 1 << max(0, (length // 32).bit_length() - 1)
    edges, edge = [0], first
    while edge < length:
        edges.append(edge)
        edge *= 2
    return edges + [length]


@torch.inference_mode()
def token_losses(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Per-position loss [S] of one window of S + 1 tokens (inputs and shifted targets), through eval's forward
    (`orchestrator.eval.forward`: the model's modules, position chunks), then its lm_head a chunk at a time."""
    window = window.to(model.embed.weight.device)
    hidden = hidden_states(model, window[None, :-1])[0]
    targets = window[1:]
    losses = [F.cross_entropy(model.lm_head(hidden[start:start + LOSS_CHUNK]).float(),
                              targets[start:start + LOSS_CHUNK], reduction="none")
              for start in range(0, len(targets), LOSS_CHUNK)]
    return torch.cat(losses).cpu()


def bucketed(losses: Iterable[torch.Tensor], edges: List[int]) -> List[Bucket]:
    """Mean loss per bucket over all sequences (every sequence has the same length, so each counts equally)."""
    sums, count = torch.zeros(len(edges) - 1, dtype=torch.float64), 0
    for loss in losses:
        sums += torch.stack([loss[a:b].double().sum() for a, b in zip(edges, edges[1:])])
        count += 1
    return [Bucket(a, b, float(total) / (count * (b - a)), count * (b - a))
            for a, b, total in zip(edges, edges[1:], sums)]
