"""`train.attention_kernel=auto`: the causal attention kernel the hardware profile measured fastest at the job's
sequence length.

Why per length: the kernels' rates cross. On an H200 FlashAttention-4 runs 1.14x cuDNN's causal kernel at 128K
tokens, while short sequences favour the kernel with the lower fixed cost; `longtrain profile hardware` measures
both at several lengths (`MeasuredRates.attention_tflops_by_kernel`). The choice is made from the profile alone, so
the planner and every worker (which load the same profile) make the same one, and a plan made for `auto` matches
the run it is used in. A chosen kernel that cannot run on a worker (fa4 without its package) is refused there in one
line, as an explicit fa4 is.
"""

from dataclasses import replace
from typing import Tuple

from spec.hardware import HardwareProfile

RUNNABLE = ("sdpa", "fa4")
"""The kernels `auto` chooses from (train.attention_kernel's other values)."""


def choose(requested: str, seq_len: int, profile: HardwareProfile) -> Tuple[str, str]:
    """(kernel, why): `requested` itself unless it is auto; auto takes the fastest measured kernel at seq_len (SDPA
    on a tie or where nothing else was measured)."""
    if requested != "auto":
        return requested, "train.attention_kernel"
    rates = {kernel: profile.measured.attention_rate(kernel, seq_len) for kernel in RUNNABLE}
    measured, unit = {kernel: rate for kernel, rate in rates.items() if rate > 0}, " TFLOP/s"
    if not measured:  # no absolute rates: the one-length speedups over SDPA
        speedups = profile.measured.attention_kernel_speedup
        measured, unit = {"sdpa": 1.0, **{k: speedups[k] for k in RUNNABLE if k in speedups}}, "x SDPA"
    best = max(measured, key=lambda kernel: (measured[kernel], kernel == "sdpa"))
    shown = ", ".join(f"{kernel} {rate:.{0 if unit == ' TFLOP/s' else 2}f}" for kernel, rate in measured.items())
    return best, f"auto: fastest at {seq_len:,} tokens in profile {profile.name} ({shown}{unit})"


def resolved(job, profile: HardwareProfile):
    """The job with train.attention_kernel=auto replaced by the kernel `choose` picks (the job itself otherwise)."""
    if job.train.attention_kernel != "auto":
        return job
    kernel, _ = choose("auto", job.data.seq_len, profile)
    return replace(job, train=replace(job.train, attention_kernel=kernel))
