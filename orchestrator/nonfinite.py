"""A step whose loss or gradients are NaN or infinite: stop the run, or skip the update (`train.on_nonfinite`).

Why this shape: a non-finite loss on one rank spreads to every rank's weights through the gradient all-reduce, and
a checkpoint of that state poisons every resume (with `checkpoint.keep_last`, pruning then deletes the good ones).
So after each optimizer step every rank contributes three flags to one all-reduce (its loss, the global gradient
norm, whether DeepSpeed dropped the update) and all ranks act alike, before any checkpoint of that step. Skipping
is DeepSpeed's own: its ZeRO 1-3 optimizers drop a step whose gradient norm is not finite (zeroing the gradients,
not stepping the LR schedule, counting `engine.skipped_steps`); we only let training go on when DeepSpeed did drop
it, and stop otherwise (ZeRO-0's optimizer applies such a step, hence `skip` needs ZeRO 1-3).
"""

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

Publish = Callable[[Dict], None]


def step_is_usable(engine, step: int, loss: float, skipped_before: int, policy: str,
                   publish: Optional[Publish]) -> bool:
    """False when the run must stop at this step (the same answer on every rank); publishes a `nonfinite` message
    (rank 0 passes `publish`) when the step was not finite, whether it was skipped or stops the run."""
    norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    flags = torch.tensor([not math.isfinite(loss), norm is not None and not math.isfinite(norm),
                          engine.skipped_steps > skipped_before], dtype=torch.float32, device=engine.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad_loss, bad_norm, dropped = (bool(f) for f in flags.tolist())
    if not (bad_loss or bad_norm or dropped):
        return True
    readings: List[Tuple[float, Optional[float]]] = [None] * dist.get_world_size()
    dist.all_gather_object(readings, (loss, norm))
    skip = policy == "skip" and dropped
    if publish:
        why = describe(readings, dropped)
        if policy == "skip" and not dropped:
            why += " and DeepSpeed applied the update, so it cannot be skipped"
        publish({"kind": "nonfinite", "step": step, "why": why, "action": "skip" if skip else "stop"})
    return skip


def describe(readings: List[Tuple[float, Optional[float]]], dropped: bool) -> str:
    """e.g. 'loss nan (ranks 0, 1), gradient norm inf' from each rank's (loss, gradient norm)."""
    ranks = [str(rank) for rank, (loss, _) in enumerate(readings) if not math.isfinite(loss)]
    parts = []
    if ranks:
        first = readings[int(ranks[0])][0]
        parts.append(f"loss {first} (rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)})")
    norm = readings[0][1]
    if norm is not None and not math.isfinite(norm):
        parts.append(f"gradient norm {norm}")
    elif dropped:
        parts.append("non-finite gradients (DeepSpeed dropped the update)")
    return ", ".join(parts)
