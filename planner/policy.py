"""MIP 1: per layer, which share of the token-wise activations stays on the GPU, goes to host memory, or is
recomputed, whether the skeletal tensors go to host too, whether the swapped share is compressed to int8,
whether the layer saves compact activations (Mesa / S2A / WTA-CRS, `orchestrator.memory.compressed`: comp_i), and
whether the whole layer is checkpointed instead (ckpt_i: only its input kept, its forward run again in backward,
attention included; the ALST recipe's choice for every layer, so a plan's feasible set holds ALST's).

Model (per GPU, per micro-batch; layers in order, forward of layer i overlaps the host copy of layer i-1, backward
of layer i+1 overlaps the prefetch of layer i):
  keep_i + swap_i + recompute_i = 1 - ckpt_i                         (continuous token fractions)
  time   = sum_i F_i + B_i + R_i * recompute_i + P_i * ckpt_i + X_i * split_i + stall_fwd_i + stall_bwd_i
               + Q_i * int8_i
        (P_i: the replayed forward, less a tiled MLP's, which the replay skips; F_i and B_i hold one pass of
        Ulysses' all-to-all each, and a split layer's backward one more, X_i: split_i >= 1 - keep_i, offload_i)
  stall_fwd_i >= bytes_i / bw - F_{i+1},
  stall_bwd_i >= bytes_i / bw - (B_{i+1} + R_{i+1} * recompute_{i+1} + P_{i+1} * ckpt_{i+1})
        (the last layer, MEMO's rule that nothing hides its copies: stall_fwd_n >= 0, stall_bwd_n >= bytes_n / bw, its
        copy back starts when its own backward does and its copy out is not waited for; `exposed_copy_seconds`)
  bytes_i = T_i * (swap_i - (1 - 1/e) * swap_int8_i) - (T_i - Tc_i) * swap_comp_i + K_i * offload_i
            - (K_i - I_i) * ckpt_off_i
        (swap_int8 = swap * int8, swap_comp = swap * comp and ckpt_off = ckpt * offload, linearised; a compressed
        layer's token-wise bytes are Tc_i, split by token like T_i; int8_i + comp_i + ckpt_i <= 1; compressing
        costs C_i seconds; I_i: the layer input, all a checkpointed layer keeps, on the GPU or on the host)
  GPU:  common = static + sum K_i (1 - offload_i) - (K_i - I_i) (ckpt_i - ckpt_off_i) + sum T_i keep_i
                 - sum (T_i - Tc_i) keep_comp_i + sum A (1 - ckpt_i) + 2 * prefetch
                 (A: a LoRA layer's adapters' saved inputs, which a checkpointed layer recomputes too)
        forward:  common + block_fwd + 2 * staging <= budget,  staging >= K_i offload_i - (K_i - I_i) ckpt_off_i
                  (a layer's skeletal copy out and the next one's, in flight)
        backward: common + block_max + staging_bwd <= budget,
                  staging_bwd >= 2 K_i offload_i - (2 K_i - I_i) ckpt_off_i (a prefetched layer's and the next one's;
                  a checkpointed layer's input is fetched when its backward starts, its copy exposed: I_i / bw)
        head:     common + head + 2 * staging <= budget (the LM head and loss, when no layer's working set is alive;
                  the last layer's outgoing copy and the first prefetch in flight)
        block_max, block_fwd >= block_i (1 - ckpt_i) - (block_i - block_c_i) * comp_i,
        block_max >= block_rb_i * ckpt_i,  block_fwd >= block_rf_i * ckpt_i
        (block_i, block_c_i: layer i's working set, plain and compressed; block_rf_i, block_rb_i: replayed whole,
        its forward and its backward half)
  host: sum_i bytes_i <= host budget per GPU
Minimise time, then (tiny weight) host bytes, so nothing is swapped that could simply stay.
Per-layer constants (F, B, R, T, K) differ where token elimination makes a layer sparse (`CostModel.layers`).
"""

import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import pulp

from planner import whole_job
from planner.cost_model import PLANNER_COMPRESSION, CostModel, LayerCost
from planner.layout import LayoutResult, solve_layout
from planner.schedule import layer_block_buffers, layer_input_bytes
from spec.activations import input_looked_up_again
from spec.plan import LayerPlan, compression_spec
from planner.solver import make_solver, solve_quietly, solver_name, status_name
from spec.units import GIB

INT8_SECONDS_PER_BYTE = 2.0 / 2.0e12
"""Quantize on the way out and dequantize on the way in, both memory-bound (~2 TB/s effective on HBM3)."""
COMPRESS_SECONDS_PER_BYTE = 3.0 / 2.0e12
"""A compressed layer reads each compressed tensor to quantise (or sample) it, and its backward writes it back
in fp32 chunks: ~3 passes over the exact bytes, memory-bound. Modest; the H100 rows measured more (the
running-range and rounding kernels are not fused), see profiles/runs/."""
HOST_TIE_BREAK = 1e-12
"""Seconds per host byte added to the objective: prefer keeping over swapping when time is equal."""
SWAP_HIDDEN_FRACTION = 0.9
"""Share of the neighbouring layer's compute a host copy may hide behind (MEMO's premise is 1). History: on
2026-11-26 the runtime's copies did not overlap at all (a 93%-swap plan at 128K grew by the whole transfer time),
so this was 0. After the runtime fix (flat DMA, prefetch gated on the layer above, host throttled to 2 layers
ahead), a hand policy swapping 90% of the tokens at 128K on an H200 (`longtrain bench --layers 4 --seq-lens
131072 --modes longtrain --policy 0/0.9/0.1/host --trace`) hid 74% of its copy time; the middle layers' copies
(0.33 s each way against 0.40 s of forward and 0.79 s of backward) were fully hidden and the exposed time was the
last layer's, which has no neighbour. 0.9 keeps a margin for copy-engine contention (docs/log.md)."""
SMOOTHING_SECONDS = 1e-6
"""Seconds per unit change of a fraction between neighbouring layers (a tie-break, far below any real cost)."""
LATE_INPUT_SECONDS = 1e-7
"""Seconds per layer from the last for a checkpointed layer whose input stays on the GPU (a tie-break): the MIP
counts every kept input at every moment, but a late layer's input lives only from its forward to its backward,
around the LM head, so the laid-out plan peaks lower when the GPU keeps the last layers' inputs (at 632K tokens
of the issue-18 job, 118 GiB against 128 GiB with layers 8-18 kept)."""


@dataclass
class PolicyResult:
    feasible: bool
    status: str
    solver: str
    solve_seconds: float
    decisions: List[LayerPlan] = field(default_factory=list)
    micro_batch_seconds: float = 0.0
    peak_gpu_bytes: float = 0.0
    host_bytes: float = 0.0
    swap_bytes_per_micro_batch: float = 0.0
    gpu_budget_bytes: float = 0.0
    host_budget_bytes: float = 0.0


@dataclass
class PolicyInputs:
    """The constants of MIP 1, taken from the cost model and the job."""

    num_layers: int
    forward_seconds: List[float]
    backward_seconds: List[float]
    recompute_seconds: List[float]
    skeletal_bytes: List[float]
    token_wise_bytes: List[float]
    """Each per layer (token-eliminated layers are cheaper)."""
    static_bytes: float
    block_bytes: float
    head_seconds: float
    pcie_bytes_per_second: float
    gpu_budget_bytes: float
    host_budget_bytes: float
    int8_factor: float
    allow_int8: bool
    compressed_token_wise_bytes: List[float] = field(default_factory=list)
    """Tc_i: each layer's token-wise bytes if compressed (the compact forms; empty when no layer may be)."""
    compress: Tuple[str, ...] = ()
    """Per layer: "no", "may" (the MIP chooses) or "must" (the job's compression section names the layer)."""
    layer_block_bytes: List[float] = field(default_factory=list)
    compressed_block_bytes: List[float] = field(default_factory=list)
    """Each layer's working set, plain and compressed (restored activations compact); empty when no layer may be
    compressed: then every layer needs `block_bytes`, the largest layer's."""
    compression_spec: str = "none"
    """The settings a compressed layer gets (`spec.plan.compression_spec`), recorded in its decision."""
    swap_hidden_fraction: float = SWAP_HIDDEN_FRACTION
    """Share of the neighbouring layer's compute a host copy may hide behind (`longtrain bench --swap-hidden`)."""
    sparse: Tuple[bool, ...] = ()
    """Per layer: token-eliminated. The runtime does not split a layer that is both sparse and compressed, so
    such a layer keeps all its tokens and its skeletal tensors on the GPU."""
    head_bytes: float = 0.0
    """The LM head and loss buffers, alive when no layer's working set is (`static_bytes` leaves them out)."""
    input_bytes: List[float] = field(default_factory=list)
    """I_i: each layer's input, all a checkpointed layer keeps (0: looked up again, `input_looked_up_again`)."""
    checkpoint_block_bytes: List[float] = field(default_factory=list)
    """Each layer's working set in backward when checkpointed (its forward replayed whole before it); empty: no
    layer may be checkpointed."""
    checkpoint_forward_block_bytes: List[float] = field(default_factory=list)
    """... and in forward (placed apart: the forward holds two inputs in flight, the backward one)."""
    replay_seconds: List[float] = field(default_factory=list)
    """Each layer's replayed forward when checkpointed (`LayerCost.checkpoint_seconds`)."""
    adapter_bytes: float = 0.0
    """LoRA: what one layer's adapters keep whole on the GPU unless the layer is checkpointed (`static_bytes` leaves
    them out)."""
    regather_seconds: List[float] = field(default_factory=list)
    """Ulysses: the all-to-all a split layer's backward adds (its attention saves only this GPU's token shard of q,
    k, v and the output and exchanges them again, `orchestrator.sequence_parallel.LocalShardAttention`); a plain
    layer's attention keeps the exchanged tensors. Empty without sequence parallelism."""


def policy_inputs(cost: CostModel, zero_stage: int, block_bytes: float, approximate: bool = False,
                  time_limit_seconds: float = 5.0) -> PolicyInputs:
    """approximate: may the MIP choose int8 swaps and compressed layers (`planning` asks only once the exact
    techniques do not fit, and only under plan.allow_approximate). A job whose compression section is active gets
    its layers compressed as it says, whatever the budget, so the plan counts their bytes. `block_bytes`: the
    largest layer's working set (`largest_layer`)."""
    layers, job, profile = cost.layers(), cost.job, cost.profile
    per_layer = lambda name: [getattr(layer, name) for layer in layers]  # noqa: E731
    n = job.model.num_layers
    settings, compress = None, ()
    if job.compression.is_active:
        settings = job.compression
        chosen = set(job.compression.layer_indices(n))
        compress = tuple("must" if i in chosen else "no" for i in range(n))
    elif approximate:
        settings, compress = PLANNER_COMPRESSION, ("may",) * n
    compact = cost.compressed_layers(settings) if settings else []
    static = cost.static_memory(zero_stage)
    return PolicyInputs(
        num_layers=job.model.num_layers, forward_seconds=per_layer("forward_seconds"),
        backward_seconds=per_layer("backward_seconds"), recompute_seconds=per_layer("recompute_seconds"),
        skeletal_bytes=per_layer("skeletal_bytes"), token_wise_bytes=per_layer("token_wise_bytes"),
        static_bytes=static.total - static.head_interval - static.adapter_activations,
        head_bytes=static.head_interval, adapter_bytes=static.adapter_activations / n, block_bytes=block_bytes,
        head_seconds=cost.head_seconds(), pcie_bytes_per_second=cost.pcie_bytes_per_second(),
        gpu_budget_bytes=profile.device_memory_gib * GIB * job.plan.gpu_memory_fraction,
        host_budget_bytes=(whole_job.host_budget_bytes(job, profile)  # the offloaded states come first
                           - whole_job.host_static_bytes(job, cost.element_bytes, profile.device_kind == "cuda")),
        int8_factor=1.0 / cost.element_bytes, allow_int8=approximate,
        compressed_token_wise_bytes=[layer.token_wise_bytes for layer in compact],
        layer_block_bytes=[b.arena_bytes for b in block_layouts(layers, [], time_limit_seconds)] if compact else [],
        compressed_block_bytes=[b.arena_bytes for b in block_layouts(layers, compact, time_limit_seconds)]
        if compact else [],
        compress=compress, compression_spec=compression_spec(settings) if settings else "none",
        sparse=tuple(layer.keep_share < 1 for layer in layers),
        input_bytes=[0.0 if input_looked_up_again(i, zero_stage) else layer_input_bytes(layer)
                     for i, layer in enumerate(layers)],
        replay_seconds=[layer.checkpoint_seconds for layer in layers],
        checkpoint_block_bytes=[b.arena_bytes for b in block_layouts(layers, [], time_limit_seconds, "backward")],
        checkpoint_forward_block_bytes=[b.arena_bytes for b in block_layouts(layers, [], time_limit_seconds,
                                                                             "forward")],
        regather_seconds=per_layer("exchange_seconds") if cost.sp_degree > 1 else [])


def block_layouts(layers: List[LayerCost], compact: List[LayerCost], time_limit_seconds: float,
                  checkpoint: str = "") -> List[LayoutResult]:
    """Each layer's level-1 layout, with the compact activations of `compact` (when given), or the forward or
    backward half of the layer replayed whole (`checkpoint`); layers that share their costs share one solve."""
    solved, layouts = {}, []
    for i, layer in enumerate(layers):
        key = (id(layer), id(compact[i]) if compact else None)
        if key not in solved:
            buffers = layer_block_buffers(layer, compact=compact[i] if compact else None, checkpoint=bool(checkpoint),
                                          part=checkpoint or "both")
            solved[key] = solve_layout(buffers, time_limit_seconds)
        layouts.append(solved[key])
    return layouts


def solve_policy(inputs: PolicyInputs, time_limit_seconds: float) -> PolicyResult:
    started = time.perf_counter()
    problem, v = _build(inputs)
    solver = make_solver(time_limit_seconds)
    solve_quietly(problem, solver)
    status = status_name(problem)
    result = PolicyResult(feasible=status == "Optimal" or (status == "Not Solved" and _has_values(v)),
                          status=status, solver=solver_name(solver), solve_seconds=time.perf_counter() - started,
                          gpu_budget_bytes=inputs.gpu_budget_bytes, host_budget_bytes=inputs.host_budget_bytes)
    if result.feasible:
        _fill(result, inputs, v, inputs.compression_spec)
    return result


def exposed_copy_seconds(p: PolicyInputs, i: int, moved, recompute_next, backward: bool, replay_next=0.0):
    """Seconds of layer i's host copies (`moved` bytes each way) not hidden behind the neighbouring compute: the
    next layer's forward, or in backward the next layer's backward, its recomputed share and its replayed forward
    when it is checkpointed (`replay_next`). Negative when hidden. Works on numbers and on the MIP's affine
    expressions alike, so the MIP and `given_copies` (decisions already made) share one formula.

    The last layer has no next layer (MEMO's rule: nothing hides its copies): it is fetched when its own backward
    starts, right after the LM head. Its copy out is not waited for: its backward reads the sources still on the
    device (`SwapStream.take_held`) and fetches only what the head's forward and backward let the copy out finish,
    at most `last_layer_fetch_seconds`; the MIP prices the whole copy back (an upper bound: the minimum of two
    terms is not linear), so it swaps the last layer only where that costs less than keeping or recomputing its
    tokens. Each direction is priced at the one-way rate: copies out run in the forward and copies back in the
    backward on their own streams (`swap_stream`), so the two directions share PCIe only around the turn from
    forward to backward."""
    n = p.num_layers
    if i + 1 == n:
        return moved * (1 / p.pcie_bytes_per_second) if backward else 0.0
    if backward:
        neighbour = (p.backward_seconds[i + 1] + p.recompute_seconds[i + 1] * recompute_next
                     + _replay(p)[i + 1] * replay_next)
    else:
        neighbour = p.forward_seconds[i + 1]
    return moved * (1 / p.pcie_bytes_per_second) - p.swap_hidden_fraction * neighbour


def last_layer_fetch_seconds(p: PolicyInputs, moved: float) -> float:
    """The last layer's exposed copy time: what its copy out finished while the LM head's forward and backward ran
    (3 x head_seconds) comes back when its backward starts; the rest is read where it still is
    (`exposed_copy_seconds`)."""
    return min(moved / p.pcie_bytes_per_second, 3 * p.head_seconds)


def given_copies(p: PolicyInputs, decisions: Sequence[LayerPlan]) -> Tuple[float, List[float]]:
    """For decisions already made (a plan file, a bench row): the seconds their host copies leave exposed
    (`exposed_copy_seconds` each way, the last layer's `last_layer_fetch_seconds`, a checkpointed layer's host input
    fetched when its backward starts) and each layer's bytes moved each way."""
    n = len(decisions)
    kept = [p.input_bytes[i] if d.checkpoint_layer else p.skeletal_bytes[i] for i, d in enumerate(decisions)]
    moved = [p.token_wise_bytes[i] * d.swap_fraction + kept[i] * d.offload_skeletal for i, d in enumerate(decisions)]
    stalls = 0.0
    for i, d in enumerate(decisions):
        following = decisions[i + 1] if i + 1 < n else None
        recompute_next = following.recompute_fraction if following and not following.checkpoint_layer else 0.0
        replay_next = float(following.checkpoint_layer) if following else 0.0
        fetched = p.input_bytes[i] / p.pcie_bytes_per_second if d.checkpoint_layer and d.offload_skeletal else 0.0
        if following is None:
            stalls += max(fetched, last_layer_fetch_seconds(p, moved[i]))
            continue
        stalls += max(0.0, exposed_copy_seconds(p, i, moved[i], recompute_next, backward=False))
        stalls += max(0.0, fetched, exposed_copy_seconds(p, i, moved[i], recompute_next, backward=True,
                                                         replay_next=replay_next))
    return stalls, moved


def _build(p: PolicyInputs):
    n = p.num_layers
    problem = pulp.LpProblem("activation_policy", pulp.LpMinimize)
    keep = [problem.add_variable(f"keep{i}", 0, 1) for i in range(n)]
    swap = [problem.add_variable(f"swap{i}", 0, 1) for i in range(n)]
    recompute = [problem.add_variable(f"recompute{i}", 0, 1) for i in range(n)]
    offload = [problem.add_variable(f"offload{i}", cat="Binary") for i in range(n)]
    int8 = [problem.add_variable(f"int8_{i}", cat="Binary") for i in range(n)]  # Binary resets bounds: fix below
    swap_int8 = [problem.add_variable(f"swap_int8_{i}", 0, 1) for i in range(n)]
    comp = [problem.add_variable(f"comp{i}", cat="Binary") for i in range(n)]
    keep_comp = [problem.add_variable(f"keep_comp{i}", 0, 1) for i in range(n)]
    swap_comp = [problem.add_variable(f"swap_comp{i}", 0, 1) for i in range(n)]
    saved = [t - c for t, c in zip(p.token_wise_bytes, p.compressed_token_wise_bytes or p.token_wise_bytes)]
    ckpt = [problem.add_variable(f"ckpt{i}", cat="Binary") for i in range(n)]
    ckpt_off = [problem.add_variable(f"ckpt_off{i}", 0, 1) for i in range(n)]
    input_bytes = p.input_bytes or list(p.skeletal_bytes)
    dropped = [p.skeletal_bytes[i] - input_bytes[i] for i in range(n)]  # what checkpointing a layer drops too
    stall_fwd = [problem.add_variable(f"stall_fwd{i}", 0) for i in range(n)]
    stall_bwd = [problem.add_variable(f"stall_bwd{i}", 0) for i in range(n)]
    prefetch = problem.add_variable("prefetch_gib", 0)  # memory in GiB: bytes (1e10) beside binaries misled HiGHS's
    block = problem.add_variable("block_gib", 0)  # presolve into calling a feasible model infeasible
    staging = problem.add_variable("skeletal_staging_gib", 0)  # one layer's copy in flight in forward
    staging_bwd = problem.add_variable("skeletal_staging_backward_gib", 0)
    block_fwd = problem.add_variable("block_forward_gib", 0)
    swapped = [p.token_wise_bytes[i] * (swap[i] - (1 - p.int8_factor) * swap_int8[i]) - saved[i] * swap_comp[i]
               for i in range(n)]
    moved = [swapped[i] + p.skeletal_bytes[i] * offload[i] - dropped[i] * ckpt_off[i] for i in range(n)]
    plain_block = p.layer_block_bytes or [p.block_bytes] * n
    compact_block = p.compressed_block_bytes or plain_block
    regather = p.regather_seconds if any(p.regather_seconds) else [0.0] * n
    split = [problem.add_variable(f"split{i}", cat="Binary") for i in range(n)]  # runs the token-wise runtime
    for i in range(n):
        problem += keep[i] + swap[i] + recompute[i] == 1 - ckpt[i]
        if regather[i]:
            problem += split[i] >= 1 - keep[i]
            problem += split[i] >= offload[i]
            if i + 1 < n and _same_layer(p, i, i + 1):  # which of identical layers stay whole is symmetric: the
                problem += split[i] >= split[i + 1]     # last ones (their copies are the least hidden)
        else:
            problem += split[i] == 0
        _checkpoint_rules(problem, p, i, ckpt, ckpt_off, offload, comp, (block, block_fwd, staging_bwd))
        if not p.allow_int8:
            problem += int8[i] == 0
        problem += swap_int8[i] <= swap[i]
        problem += swap_int8[i] <= int8[i]
        problem += swap_int8[i] >= swap[i] + int8[i] - 1
        mode = p.compress[i] if p.compress else "no"
        if mode != "may":
            problem += comp[i] == (1 if mode == "must" else 0)
        problem += int8[i] + comp[i] <= 1
        for product, fraction in ((keep_comp[i], keep[i]), (swap_comp[i], swap[i])):
            problem += product <= fraction
            problem += product <= comp[i]
            problem += product >= fraction + comp[i] - 1
        if p.sparse and p.sparse[i]:
            problem += keep[i] >= comp[i]
            problem += offload[i] <= 1 - comp[i]
        recompute_next, replay_next = (recompute[i + 1], ckpt[i + 1]) if i + 1 < n else (0, 0)
        problem += stall_fwd[i] >= exposed_copy_seconds(p, i, moved[i], recompute_next, backward=False)
        problem += stall_bwd[i] >= exposed_copy_seconds(p, i, moved[i], recompute_next, backward=True,
                                                        replay_next=replay_next)
        problem += stall_bwd[i] >= input_bytes[i] / p.pcie_bytes_per_second * ckpt_off[i]  # fetched, not prefetched
        problem += prefetch >= swapped[i] * (1 / GIB)
        for whole in (block, block_fwd):  # a layer's working set, unless it is checkpointed (see the rules)
            problem += whole >= (plain_block[i] * (1 - ckpt[i]) - (plain_block[i] - compact_block[i]) * comp[i]) / GIB
        problem += staging >= (p.skeletal_bytes[i] * offload[i] - dropped[i] * ckpt_off[i]) * (1 / GIB)
    kept = pulp.lpSum(p.skeletal_bytes[i] * (1 - offload[i]) - dropped[i] * (ckpt[i] - ckpt_off[i])
                      + p.token_wise_bytes[i] * keep[i] - saved[i] * keep_comp[i]
                      + p.adapter_bytes * (1 - ckpt[i]) for i in range(n))
    common = (p.static_bytes + kept) * (1 / GIB) + 2 * prefetch
    problem += common + block_fwd + 2 * staging <= p.gpu_budget_bytes / GIB
    problem += common + block + staging_bwd <= p.gpu_budget_bytes / GIB
    problem += common + p.head_bytes / GIB + 2 * staging <= p.gpu_budget_bytes / GIB
    problem += pulp.lpSum(moved) * (1 / GIB) <= p.host_budget_bytes / GIB
    seconds = pulp.lpSum(p.recompute_seconds[i] * recompute[i] + _replay(p)[i] * ckpt[i] + regather[i] * split[i]
                         + stall_fwd[i] + stall_bwd[i]
                         + INT8_SECONDS_PER_BYTE * p.token_wise_bytes[i] * swap_int8[i]
                         + COMPRESS_SECONDS_PER_BYTE * p.token_wise_bytes[i] * comp[i] for i in range(n))
    late = pulp.lpSum((n - 1 - i) * (ckpt[i] - ckpt_off[i]) for i in range(n))
    problem += (seconds + HOST_TIE_BREAK * pulp.lpSum(moved) + SMOOTHING_SECONDS * _changes(problem, [keep, swap, offload])
                + LATE_INPUT_SECONDS * late)
    variables = dict(keep=keep, swap=swap, recompute=recompute, offload=offload, int8=int8, swap_int8=swap_int8,
                     comp=comp, ckpt=ckpt, split=split, stall_fwd=stall_fwd, stall_bwd=stall_bwd, prefetch=prefetch,
                     staging=staging, staging_bwd=staging_bwd, block=block, block_fwd=block_fwd)
    return problem, variables


def _same_layer(p: PolicyInputs, i: int, j: int) -> bool:
    """Layers i and j have the same constants (a dense model's layers, token-eliminated ones aside)."""
    per_layer = [p.forward_seconds, p.backward_seconds, p.recompute_seconds, p.skeletal_bytes, p.token_wise_bytes,
                 p.regather_seconds, p.compressed_token_wise_bytes, p.layer_block_bytes, p.compressed_block_bytes,
                 p.input_bytes, p.checkpoint_block_bytes, p.checkpoint_forward_block_bytes, p.replay_seconds,
                 list(p.compress), list(p.sparse)]
    return all(values[i] == values[j] for values in per_layer if values)


def _replay(p: PolicyInputs) -> List[float]:
    return p.replay_seconds or p.forward_seconds


def _checkpoint_rules(problem: pulp.LpProblem, p: PolicyInputs, i: int, ckpt, ckpt_off, offload, comp,
                      memory) -> None:
    """ckpt_off = ckpt x offload (the input of a checkpointed layer in host memory); a checkpointed layer is neither
    compressed nor token-eliminated (the runtime replays the plain forward); its working sets, forward and
    backward; in backward its input in host memory comes back when its own backward starts (one input on the GPU,
    a prefetched layer's skeletal tensors two), the copy not hidden."""
    block, block_fwd, staging_bwd = memory
    problem += ckpt_off[i] <= ckpt[i]
    problem += ckpt_off[i] <= offload[i]
    if p.input_bytes and not p.input_bytes[i]:  # nothing kept: nothing in host memory either
        problem += ckpt_off[i] == 0
    problem += ckpt_off[i] >= ckpt[i] + offload[i] - 1
    problem += ckpt[i] + comp[i] <= 1
    problem += staging_bwd >= (2 * p.skeletal_bytes[i] * offload[i]
                               - (2 * p.skeletal_bytes[i] - (p.input_bytes or p.skeletal_bytes)[i]) * ckpt_off[i]) / GIB
    if not p.checkpoint_block_bytes or (p.sparse and p.sparse[i]):
        problem += ckpt[i] == 0
        return
    problem += block >= p.checkpoint_block_bytes[i] / GIB * ckpt[i]
    problem += block_fwd >= p.checkpoint_forward_block_bytes[i] / GIB * ckpt[i]


def _changes(problem: pulp.LpProblem, series: List[List[pulp.LpVariable]]):
    """Sum of |x_i - x_(i-1)| over layers: identical layers get identical decisions among equal-time optima."""
    terms = []
    for name, values in zip(("keep", "swap", "offload"), series):
        for i in range(1, len(values)):
            change = problem.add_variable(f"change_{name}{i}", 0)
            problem += change >= values[i] - values[i - 1]
            problem += change >= values[i - 1] - values[i]
            terms.append(change)
    return pulp.lpSum(terms)


def _has_values(v: Dict) -> bool:
    return all(x.value() is not None for x in v["keep"])


def _fill(result: PolicyResult, p: PolicyInputs, v: Dict, spec: str) -> None:
    value = lambda x: max(0.0, float(x.value() or 0.0))  # noqa: E731 (solver noise below zero)
    for i in range(p.num_layers):
        if value(v["ckpt"][i]) > 0.5:
            result.decisions.append(LayerPlan(layer=i, keep_fraction=0.0, recompute_fraction=1.0,
                                              offload_skeletal=value(v["offload"][i]) > 0.5, checkpoint_layer=True))
            continue
        result.decisions.append(LayerPlan(
            layer=i, keep_fraction=value(v["keep"][i]), swap_fraction=value(v["swap"][i]),
            recompute_fraction=value(v["recompute"][i]), offload_skeletal=value(v["offload"][i]) > 0.5,
            swap_codec="int8" if value(v["int8"][i]) > 0.5 and value(v["swap"][i]) > 0 else "none",
            activation_compression=spec if value(v["comp"][i]) > 0.5 else "none"))
    token_wise = [p.compressed_token_wise_bytes[i] if d.activation_compression != "none" else p.token_wise_bytes[i]
                  for i, d in enumerate(result.decisions)]
    skeletal = [(p.input_bytes or p.skeletal_bytes)[i] if d.checkpoint_layer else p.skeletal_bytes[i]
                for i, d in enumerate(result.decisions)]
    moved = [t * d.swap_fraction * (p.int8_factor if d.swap_codec == "int8" else 1.0) + k * d.offload_skeletal
             for t, k, d in zip(token_wise, skeletal, result.decisions)]
    regather = p.regather_seconds or [0.0] * p.num_layers
    extra = sum((_replay(p)[i] if d.checkpoint_layer else p.recompute_seconds[i] * d.recompute_fraction)
                + COMPRESS_SECONDS_PER_BYTE * p.token_wise_bytes[i] * (d.activation_compression != "none")
                + regather[i] * (value(v["split"][i]) > 0.5)
                for i, d in enumerate(result.decisions))
    stalls = sum(value(s) for s in v["stall_fwd"] + v["stall_bwd"])
    result.micro_batch_seconds = (sum(p.forward_seconds) + sum(p.backward_seconds) + 3 * p.head_seconds
                                  + extra + stalls)
    result.host_bytes = sum(moved)
    result.swap_bytes_per_micro_batch = 2 * sum(moved)
    staging = max([k for k, d in zip(skeletal, result.decisions) if d.offload_skeletal], default=0.0)
    staging_bwd = max([k * (1 if d.checkpoint_layer else 2) for k, d in zip(skeletal, result.decisions)
                       if d.offload_skeletal], default=0.0)
    working = max(value(v["block_fwd"]) * GIB + 2 * staging, value(v["block"]) * GIB + staging_bwd,
                  p.head_bytes + 2 * staging)
    result.peak_gpu_bytes = (p.static_bytes + working + 2 * value(v["prefetch"]) * GIB
                             + sum(k * (not d.offload_skeletal) + t * d.keep_fraction
                                   + p.adapter_bytes * (not d.checkpoint_layer)
                                   for t, k, d in zip(token_wise, skeletal, result.decisions)))
