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
The cross-entropy itself is a small custom function that keeps no fp32 copy of the logits for backward.
The loss is the mean over tokens whose target is not `ignore_index`, as `F.cross_entropy` computes it; only the
order of floating-point sums differs from the full path (fp32 tolerance, not bitwise).
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from spec.activations import LOSS_CHUNK_TOKENS  # the planner budgets one chunk's logits in the arena

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
    return _CrossEntropySum.apply(head(rows), labels)


class _CrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of [T, V] logits in fp32 arithmetic, keeping only the logits themselves for backward.

    Why not `F.cross_entropy(logits.float())`: autograd keeps the fp32 copy's log-softmax and its backward adds
    fp32 and low-precision gradients: 12 bytes per logit beside the bf16 logits (CPU peak RSS; with it, head + loss
    of 32K tokens x 128K vocab peaked at 14.3 GiB on an H100). Here forward holds one fp32 copy at a time (the
    exponentials are taken in place) and backward rebuilds the softmax into one fp32 buffer: 8 bytes per logit
    beside the logits (CPU peak RSS, tested), the planner's e + 8 in all; not yet measured on a GPU.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        valid, safe = labels != IGNORE_INDEX, labels.clamp(min=0)
        work = logits.to(torch.float32, copy=True)
        picked = work.gather(1, safe[:, None]).squeeze(1)
        top = work.amax(1, keepdim=True)
        lse = work.sub_(top).exp_().sum(1).log_() + top.squeeze(1)
        del work
        ctx.save_for_backward(logits, safe, valid, lse)
        return ((lse - picked) * valid).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        probs = logits.float().sub(lse[:, None]).exp_()  # softmax, rebuilt in one fp32 buffer
        probs[torch.arange(len(safe), device=safe.device), safe] -= 1.0
        probs.mul_((valid * grad.float())[:, None])
        return probs.to(logits.dtype), None
