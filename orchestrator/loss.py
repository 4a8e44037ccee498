"""Segmented LM head + cross-entropy: the loss over all tokens without the tokens x vocab logits ever existing.

Why: at long context the logits are the largest single activation (1M tokens x 128K vocab in fp32 is 512 GiB,
and the softmax saves another copy), although each token's loss needs only its own row. Following LeMo/Jenga's
"segment-based peak cutting" (arXiv 2501.09767; its code wraps 2048-token chunks in torch.utils.checkpoint), the
tokens are cut into chunks of LOSS_CHUNK_TOKENS (the planner's, which budgets one chunk's logits); each chunk's
LM head and summed cross-entropy run under non-reentrant checkpointing, so between forward and backward only the
chunk's input rows (a view of the final hidden states, which the full path saves too) are kept, and the chunk's
logits are rebuilt, used and freed one chunk at a time in backward.
Peak extra memory is O(chunk x vocab) instead of O(tokens x vocab).

The head is called as a module (not through its weight), so DeepSpeed ZeRO-3 gathers its weight on every call,
in forward and in the recomputation. Cost: the LM head forward runs twice (8 instead of 6 x its weights in FLOPs).
The loss is the mean over tokens whose target is not `ignore_index`, as `F.cross_entropy` computes it; only the
order of floating-point sums differs from the full path (fp32 tolerance, not bitwise).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from planner.cost_model import LOSS_CHUNK_TOKENS  # the planner budgets one chunk's logits in the arena

IGNORE_INDEX = -100


def segmented_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                            chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `targets`, computed `chunk_tokens` rows at a time."""
    assert chunk_tokens > 0, chunk_tokens
    rows, labels = hidden.flatten(0, -2), targets.flatten()
    recompute = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in head.parameters()))
    total = None
    for start in range(0, rows.shape[0], chunk_tokens):
        part = (rows[start:start + chunk_tokens], labels[start:start + chunk_tokens])
        if recompute:
            loss = checkpoint(_chunk_loss_sum, head, *part, use_reentrant=False, preserve_rng_state=False)
        else:
            loss = _chunk_loss_sum(head, *part)
        total = loss if total is None else total + loss
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _chunk_loss_sum(head: nn.Module, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
