"""MIP 1: per layer, which share of the token-wise activations stays on the GPU, goes to host memory, or is
recomputed, whether the skeletal tensors go to host too, whether the swapped share is compressed to int8, and
whether the layer saves compact activations (Mesa / S2A / WTA-CRS, `orchestrator.memory.compressed`: comp_i).

Model (per GPU, per micro-batch; layers in order, forward of layer i overlaps the host copy of layer i-1, backward
of layer i+1 overlaps the prefetch of layer i):
  keep_i + swap_i + recompute_i = 1                                  (continuous token fractions)
  time   = sum_i F_i + B_i + R_i * recompute_i + stall_fwd_i + stall_bwd_i + Q_i * int8_i
  stall_fwd_i >= bytes_i / bw - F_{i+1},  stall_bwd_i >= bytes_i / bw - (B_{i+1} + R_{i+1} * recompute_{i+1})
  bytes_i = T_i * (swap_i - (1 - 1/e) * swap_int8_i) - (T_i - Tc_i) * swap_comp_i + K_i * offload_i
        (swap_int8 = swap * int8 and swap_comp = swap * comp, linearised; a compressed layer's token-wise bytes
        are Tc_i, split by token like T_i; int8_i + comp_i <= 1; compressing costs C_i seconds)
  GPU:  static + sum K_i (1 - offload_i) + sum T_i keep_i - sum (T_i - Tc_i) keep_comp_i + block_max
        + 2 * (prefetch + max K * any_offload) <= budget,  block_max >= block_i - (block_i - block_c_i) * comp_i
        (block_i, block_c_i: layer i's working set, plain and compressed)
        (at the LM head the last layer's outgoing copy and its prefetch are both in flight: hence the 2)
  host: sum_i bytes_i <= host budget per GPU
Minimise time, then (tiny weight) host bytes, so nothing is swapped that could simply stay.
Per-layer constants (F, B, R, T, K) differ where token elimination makes a layer sparse (`CostModel.layers`).
"""

import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import pulp

from planner import whole_job
from planner.cost_model import PLANNER_COMPRESSION, CostModel, LayerCost
from planner.layout import LayoutResult, solve_layout
from planner.schedule import layer_block_buffers
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
    return PolicyInputs(
        num_layers=job.model.num_layers, forward_seconds=per_layer("forward_seconds"),
        backward_seconds=per_layer("backward_seconds"), recompute_seconds=per_layer("recompute_seconds"),
        skeletal_bytes=per_layer("skeletal_bytes"), token_wise_bytes=per_layer("token_wise_bytes"),
        static_bytes=cost.static_memory(zero_stage).total, block_bytes=block_bytes,
        head_seconds=cost.head_seconds(), pcie_bytes_per_second=cost.pcie_bytes_per_second(),
        gpu_budget_bytes=profile.device_memory_gib * GIB * job.plan.gpu_memory_fraction,
        host_budget_bytes=(whole_job.host_budget_bytes(job, profile)
                           - whole_job.host_static_bytes(job, cost.element_bytes)),  # offload comes first
        int8_factor=1.0 / cost.element_bytes, allow_int8=approximate,
        compressed_token_wise_bytes=[layer.token_wise_bytes for layer in compact],
        layer_block_bytes=[b.arena_bytes for b in block_layouts(layers, [], time_limit_seconds)] if compact else [],
        compressed_block_bytes=[b.arena_bytes for b in block_layouts(layers, compact, time_limit_seconds)]
        if compact else [],
        compress=compress, compression_spec=compression_spec(settings) if settings else "none",
        sparse=tuple(layer.keep_share < 1 for layer in layers))


def block_layouts(layers: List[LayerCost], compact: List[LayerCost], time_limit_seconds: float) -> List[LayoutResult]:
    """Each layer's level-1 layout, with the compact activations of `compact` (when given); layers that share their
    costs share one solve."""
    solved, layouts = {}, []
    for i, layer in enumerate(layers):
        key = (id(layer), id(compact[i]) if compact else None)
        if key not in solved:
            solved[key] = solve_layout(layer_block_buffers(layer, compact=compact[i] if compact else None),
                                       time_limit_seconds)
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


def exposed_copy_seconds(p: PolicyInputs, i: int, moved, recompute_next, backward: bool):
    """Seconds of layer i's host copies (`moved` bytes each way) not hidden behind the neighbouring compute: the
    next layer's forward, or in backward the next layer's backward and its recomputed share (the LM head after the
    last layer). Negative when hidden. Works on numbers and on the MIP's affine expressions alike, so the MIP and
    `launch.measure.calibration.predict` share one formula."""
    n = p.num_layers
    if backward:
        neighbour = (p.backward_seconds[i + 1] + p.recompute_seconds[i + 1] * recompute_next) if i + 1 < n \
            else 2 * p.head_seconds
    else:
        neighbour = p.forward_seconds[i + 1] if i + 1 < n else p.head_seconds
    return moved * (1 / p.pcie_bytes_per_second) - p.swap_hidden_fraction * neighbour


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
    stall_fwd = [problem.add_variable(f"stall_fwd{i}", 0) for i in range(n)]
    stall_bwd = [problem.add_variable(f"stall_bwd{i}", 0) for i in range(n)]
    prefetch = problem.add_variable("prefetch_bytes", 0)
    block = problem.add_variable("block_bytes", 0)
    any_offload = problem.add_variable("any_offload", cat="Binary")
    swapped = [p.token_wise_bytes[i] * (swap[i] - (1 - p.int8_factor) * swap_int8[i]) - saved[i] * swap_comp[i]
               for i in range(n)]
    moved = [swapped[i] + p.skeletal_bytes[i] * offload[i] for i in range(n)]
    plain_block = p.layer_block_bytes or [p.block_bytes] * n
    compact_block = p.compressed_block_bytes or plain_block
    for i in range(n):
        problem += keep[i] + swap[i] + recompute[i] == 1
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
        recompute_next = recompute[i + 1] if i + 1 < n else 0
        problem += stall_fwd[i] >= exposed_copy_seconds(p, i, moved[i], recompute_next, backward=False)
        problem += stall_bwd[i] >= exposed_copy_seconds(p, i, moved[i], recompute_next, backward=True)
        problem += prefetch >= swapped[i]
        problem += block >= plain_block[i] - (plain_block[i] - compact_block[i]) * comp[i]
        problem += any_offload >= offload[i]
    gpu = (p.static_bytes + block + 2 * prefetch
           + pulp.lpSum(p.skeletal_bytes[i] * (1 - offload[i]) + p.token_wise_bytes[i] * keep[i]
                        - saved[i] * keep_comp[i] for i in range(n))
           + 2 * max(p.skeletal_bytes) * any_offload)
    problem += gpu <= p.gpu_budget_bytes
    problem += pulp.lpSum(moved) <= p.host_budget_bytes
    seconds = pulp.lpSum(p.recompute_seconds[i] * recompute[i] + stall_fwd[i] + stall_bwd[i]
                         + INT8_SECONDS_PER_BYTE * p.token_wise_bytes[i] * swap_int8[i]
                         + COMPRESS_SECONDS_PER_BYTE * p.token_wise_bytes[i] * comp[i] for i in range(n))
    problem += seconds + HOST_TIE_BREAK * pulp.lpSum(moved) + SMOOTHING_SECONDS * _changes(problem, [keep, swap, offload])
    variables = dict(keep=keep, swap=swap, recompute=recompute, offload=offload, int8=int8, swap_int8=swap_int8,
                     comp=comp, stall_fwd=stall_fwd, stall_bwd=stall_bwd, prefetch=prefetch, any_offload=any_offload,
                     block=block)
    return problem, variables


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
        result.decisions.append(LayerPlan(
            layer=i, keep_fraction=value(v["keep"][i]), swap_fraction=value(v["swap"][i]),
            recompute_fraction=value(v["recompute"][i]), offload_skeletal=value(v["offload"][i]) > 0.5,
            swap_codec="int8" if value(v["int8"][i]) > 0.5 and value(v["swap"][i]) > 0 else "none",
            activation_compression=spec if value(v["comp"][i]) > 0.5 else "none"))
    token_wise = [p.compressed_token_wise_bytes[i] if d.activation_compression != "none" else p.token_wise_bytes[i]
                  for i, d in enumerate(result.decisions)]
    moved = [t * d.swap_fraction * (p.int8_factor if d.swap_codec == "int8" else 1.0)
             + p.skeletal_bytes[i] * d.offload_skeletal for i, (t, d) in enumerate(zip(token_wise, result.decisions))]
    extra = sum(p.recompute_seconds[i] * d.recompute_fraction
                + COMPRESS_SECONDS_PER_BYTE * p.token_wise_bytes[i] * (d.activation_compression != "none")
                for i, d in enumerate(result.decisions))
    stalls = sum(value(s) for s in v["stall_fwd"] + v["stall_bwd"])
    result.micro_batch_seconds = (sum(p.forward_seconds) + sum(p.backward_seconds) + 3 * p.head_seconds
                                  + extra + stalls)
    result.host_bytes = sum(moved)
    result.swap_bytes_per_micro_batch = 2 * sum(moved)
    offloaded = any(d.offload_skeletal for d in result.decisions)
    result.peak_gpu_bytes = (p.static_bytes + value(v["block"]) + 2 * value(v["prefetch"])
                             + 2 * max(p.skeletal_bytes) * offloaded
                             + sum(p.skeletal_bytes[i] * (not d.offload_skeletal) + t * d.keep_fraction
                                   for i, (t, d) in enumerate(zip(token_wise, result.decisions))))
