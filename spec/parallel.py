"""The parallel sizes of a job: one object, built and validated once, read everywhere else.

Why one object: "data-parallel size" meant two things in two places (ZeRO's world of every rank vs the sampler's
world of distinct sequences), and resuming a sequence-parallel run went wrong where they were mixed up. Here each
size has one name and one formula:

- `world_size`: ranks (one per worker); ZeRO shards and averages over all of them, Ulysses groups included.
- `sp_degree`: consecutive ranks that share one sequence (Ulysses), each holding `tokens_per_rank` tokens.
- `dp_degree`: groups that read different sequences = the sampler's world; a rank's sampler rank is
  `rank // sp_degree`.
"""

from dataclasses import dataclass
from typing import List

TOKEN_BLOCK = 64
"""Sequence lengths are multiples of this (token elimination's blocks, Ulysses' shards, the planner's grid)."""


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    sp_degree: int
    seq_len: int
    micro_batch_size: int = 1
    grad_accum_steps: int = 1

    @classmethod
    def from_job(cls, job) -> "ParallelDims":
        """The sizes of a `JobConfig` (cluster.num_workers ranks, parallel.sp_degree)."""
        return cls(job.cluster.num_workers, job.parallel.sp_degree, job.data.seq_len, job.data.micro_batch_size,
                   job.train.grad_accum_steps)

    @property
    def dp_degree(self) -> int:
        """Groups reading different sequences: the sampler's world."""
        return self.world_size // self.sp_degree

    @property
    def zero_world_size(self) -> int:
        """Ranks ZeRO shards the optimizer state over (a checkpoint's world size): every rank."""
        return self.world_size

    @property
    def tokens_per_rank(self) -> int:
        """Tokens of one micro-batch a rank holds (its shard of each sequence)."""
        return self.seq_len * self.micro_batch_size // self.sp_degree

    @property
    def tokens_per_step_per_rank(self) -> int:
        """Tokens one rank processes per optimizer step."""
        return self.tokens_per_rank * self.grad_accum_steps

    def sampler_rank(self, rank: int) -> int:
        """The data-parallel group of `rank` (the ranks of one Ulysses group read the same windows)."""
        return rank // self.sp_degree

    def problems(self, num_heads: int, num_kv_heads: int) -> List[str]:
        """Why these sizes cannot run a model with these heads (empty: they can), each naming the key and fix."""
        sp, found = self.sp_degree, []
        if sp <= 1:
            return found
        if self.seq_len % (TOKEN_BLOCK * sp):
            found.append(f"data.seq_len ({self.seq_len}) must be divisible by {TOKEN_BLOCK}*parallel.sp_degree "
                         f"({TOKEN_BLOCK * sp}); change data.seq_len or parallel.sp_degree")
        if num_heads % sp or num_kv_heads % sp:
            found.append(f"parallel.sp_degree ({sp}) must divide model.num_heads ({num_heads}) and "
                         f"model.num_kv_heads ({num_kv_heads}) (Ulysses splits heads)")
        if self.world_size % sp:
            found.append(f"cluster.num_workers ({self.world_size}) must be a multiple of "
                         f"parallel.sp_degree ({sp})")
        return found
