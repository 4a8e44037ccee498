"""`longtrain plan --max-seq`: the longest sequence a job trains on its GPUs, and the constraint that stops it.

Why a search and not a formula: what fits depends on the policy the MIP finds (how much goes to the host, what is
recomputed) and on the laid-out arena, so each length is planned as `longtrain plan` would plan it. Lengths double
from the configured one until a plan fails, then bisect in whole token blocks (x the Ulysses degree). The answer is
one line: the length, the plan's step time and memory there, and the binding constraint one block further on.
The ALST baseline (`train.activation_checkpointing=alst`) is searched the same way on its own prediction
(`planner.alst`).
"""

import copy
from dataclasses import dataclass
from planner import whole_job
from planner.alst import predict_alst
from planner.planning import PlanInfeasible, _solve, gpu_floor_bytes, least_kept_bytes, make_plan
from spec.config import TOKEN_BLOCK, JobConfig
from spec.hardware import HardwareProfile
from spec.units import GIB

MAX_SEQ_LEN = 1 << 24
"""Where the doubling stops (16M tokens)."""


@dataclass
class Longest:
    seq_len: int
    at_longest: str
    """The prediction at that length, in words."""
    binding: str
    """Why one more block does not fit, in words."""


def longest_sequence(job: JobConfig, profile: HardwareProfile) -> Longest:
    """The longest data.seq_len that plans (or, for the ALST recipe, whose prediction fits)."""
    fits = _alst_fits if job.train.activation_checkpointing == "alst" else _plan_fits
    unit = TOKEN_BLOCK * job.parallel.sp_degree
    low, high = 0, max(1, job.data.seq_len // unit)
    while fits(_at(job, high * unit), profile) and high * unit < MAX_SEQ_LEN:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(_at(job, middle * unit), profile) else (low, middle)
    if low == 0:
        return Longest(0, "nothing fits", _binding(_at(job, unit), profile))
    return Longest(low * unit, _describe(_at(job, low * unit), profile), _binding(_at(job, high * unit), profile))


def longest_line(job: JobConfig, profile: HardwareProfile, longest: Longest) -> str:
    recipe = "the ALST recipe" if job.train.activation_checkpointing == "alst" else "longtrain's plan"
    host = whole_job.host_memory(job, profile)
    if not longest.seq_len:
        return (f"nothing fits on {job.cluster.num_workers} x {profile.name} with {recipe} even at "
                f"{TOKEN_BLOCK * job.parallel.sp_degree} tokens; binding: {longest.binding}")
    return (f"longest sequence with {recipe} on {job.cluster.num_workers} x {profile.name} (host memory "
            f"{host.gib:g} GiB per node): data.seq_len={longest.seq_len} ({longest.at_longest}); binding at "
            f"{longest.seq_len + TOKEN_BLOCK * job.parallel.sp_degree:,}: {longest.binding}")


def _at(job: JobConfig, seq_len: int) -> JobConfig:
    trial = copy.deepcopy(job)
    trial.data.seq_len = seq_len
    return trial


def _plan_fits(job: JobConfig, profile: HardwareProfile) -> bool:
    try:
        make_plan(job, profile, explain=False)
    except PlanInfeasible:
        return False
    return True


def _alst_fits(job: JobConfig, profile: HardwareProfile) -> bool:
    return predict_alst(job, profile).fits


def _describe(job: JobConfig, profile: HardwareProfile) -> str:
    if job.train.activation_checkpointing == "alst":
        p = predict_alst(job, profile)
        return (f"step {p.step_seconds:.1f} s, MFU {p.mfu:.1%}, GPU {p.peak_gpu_gib:.1f} of {p.gpu_budget_gib:.1f} GiB, "
                f"host {p.host_gib:.1f} of {p.host_budget_gib:.1f} GiB")
    p = make_plan(job, profile).plan.predicted
    return (f"step {p['step_seconds']:.1f} s, MFU {p['mfu']:.1%}, GPU {p['peak_gpu_gib']:.1f} of "
            f"{p['gpu_budget_gib']:.1f} GiB, host {p['host_gib']:.1f} of {p['host_budget_gib']:.1f} GiB")


def _binding(job: JobConfig, profile: HardwareProfile) -> str:
    """Why this length does not fit: GPU or host memory, with the numbers (no search for a fix)."""
    if job.train.activation_checkpointing == "alst":
        return predict_alst(job, profile).binding()
    try:
        make_plan(job, profile, explain=False)
    except PlanInfeasible as refusal:
        if str(refusal).startswith("does not fit the host memory"):
            return "host memory (offloaded optimizer / parameters)"
    _, policy, inputs, _ = _solve(job, profile)
    if policy.feasible:  # the policy fitted its estimate; the laid-out arena did not
        return f"GPU memory (the laid-out plan above the {inputs.gpu_budget_bytes / GIB:.1f} GiB budget)"
    floor, on_gpu, working = gpu_floor_bytes(inputs)
    checkpointable = bool(inputs.checkpoint_block_bytes)
    kept = sum(least_kept_bytes(inputs))
    if kept > inputs.host_budget_bytes:
        replay = max(working, min(inputs.checkpoint_block_bytes)) if checkpointable else working
        room = max(0.0, inputs.gpu_budget_bytes - (floor - on_gpu - working + replay))
        what = ("the layer inputs, all a layer checkpointed whole keeps" if checkpointable
                else "the layer inputs and attention outputs, which a plan never recomputes")
        return (f"host + GPU memory for {what} ({kept / GIB:.1f} GiB) against the host budget "
                f"({inputs.host_budget_bytes / GIB:.1f} GiB per GPU) plus the GPU's room beside weights, states and "
                f"one layer's working set ({room / GIB:.1f} GiB)")
    return (f"GPU memory (at least {floor / GIB:.1f} GiB with every activation on the host or recomputed: weights "
            f"and states {inputs.static_bytes / GIB:.1f}, the largest working set (a layer's or the LM head's) "
            f"{working / GIB:.1f} GiB; budget {inputs.gpu_budget_bytes / GIB:.1f} GiB)")
