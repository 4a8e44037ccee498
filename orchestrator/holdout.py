"""The loss on the holdout split during training (`metrics.eval_every_steps`).

Why the same micro-batches every time: each evaluation starts a fresh sampler over the holdout windows, so the
losses of successive evaluations are comparable (they differ only by the weights). Why in a no-grad forward of
the DeepSpeed engine itself: that is the model being trained, sharded as it is (ZeRO-3 gathers its parameters
as in a training forward), with the plan's memory techniques in place.
"""

from typing import Callable, Optional

import torch
import torch.distributed as dist

from orchestrator.data import RankSampler


class HoldoutWindows:
    """The holdout part of a window source, seen as a source of its own (what `RankSampler` reads)."""

    def __init__(self, windows):
        self.windows = windows
        self.num_train = windows.num_holdout

    def window(self, index: int, holdout: bool = False):
        return self.windows.window(index, holdout=True)

    def layout(self, rows):
        return self.windows.layout(rows)


def holdout_loss(engine, windows, micro_batch_size: int, sampler_rank: int, dp_degree: int, seed: int,
                 batches: int, micro_batch_loss: Callable) -> Optional[float]:
    """The mean loss of `batches` holdout micro-batches per rank, averaged over all ranks (every rank calls it);
    None when the data has no holdout windows (data.holdout_fraction=0)."""
    if windows.num_holdout < 1:
        return None
    sampler = RankSampler(HoldoutWindows(windows), micro_batch_size, sampler_rank, dp_degree, seed)
    total = torch.zeros((), device=engine.device)
    engine.eval()
    try:
        with torch.no_grad():
            for _ in range(batches):
                total += micro_batch_loss(sampler.next_micro_batch()).detach().float()
    finally:
        engine.train()
    dist.all_reduce(total)
    return (total / batches / dist.get_world_size()).item()
