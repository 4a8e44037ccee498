"""MIP 2: static memory layout. Give every planned buffer a byte offset in one arena so that no two buffers
alive at the same time overlap, with the arena as small as possible (dynamic storage allocation).

Why: the caching allocator fragments at long context (a 10 GB hole left by one layer cannot hold the next
layer's 11 GB tensor). Offsets fixed offline turn every planned allocation into a view of one preallocated buffer.
The best-fit greedy placement is the start and the fallback; the MIP (a binary order per pair of buffers whose
lifetimes overlap, big-M non-overlap constraints) runs only when the greedy is above the lower bound (the most
bytes ever live at once), since matching the bound proves optimality.
"""

import itertools
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import pulp

from spec.placement import Buffer, arena_size, best_fit, lower_bound
from spec.plan import ALIGN_BYTES
from planner.solver import make_solver, solve_quietly, solver_name, status_name

MAX_MIP_PAIRS = 4000
"""Beyond this many overlapping pairs the MIP is not attempted (the greedy result is kept and reported)."""


@dataclass
class LayoutResult:
    buffers: List[Buffer]
    arena_bytes: int
    lower_bound_bytes: int
    greedy_arena_bytes: int
    solver: str
    status: str
    solve_seconds: float

    @property
    def ratio(self) -> float:
        return self.arena_bytes / max(self.lower_bound_bytes, 1)

    @property
    def greedy_ratio(self) -> float:
        return self.greedy_arena_bytes / max(self.lower_bound_bytes, 1)


def solve_layout(buffers: List[Buffer], time_limit_seconds: float) -> LayoutResult:
    """Offsets for the buffers (written into them), greedy or MIP, whichever is smaller."""
    started = time.perf_counter()
    bound = lower_bound(buffers)
    greedy = best_fit(buffers)
    greedy_arena = arena_size(buffers, greedy)
    offsets, solver, status = greedy, "greedy best-fit", "optimal (meets the lower bound)"
    if greedy_arena > bound:
        pairs = [(i, j) for i, j in itertools.combinations(range(len(buffers)), 2)
                 if buffers[i].overlaps_in_time(buffers[j])]
        if len(pairs) > MAX_MIP_PAIRS:
            status = f"greedy kept (MIP skipped: {len(pairs)} overlapping pairs > {MAX_MIP_PAIRS})"
        else:
            found = _solve_mip(buffers, pairs, greedy_arena, bound, time_limit_seconds)
            solver, status = found["solver"], found["status"]
            if found["offsets"] is not None and arena_size(buffers, found["offsets"]) < greedy_arena:
                offsets = found["offsets"]
            else:
                status = f"greedy kept (MIP {found['status']} within {time_limit_seconds:g} s)"
    for i, buffer in enumerate(buffers):
        buffer.offset_bytes = offsets[i]
    return LayoutResult(buffers=buffers, arena_bytes=arena_size(buffers, offsets), lower_bound_bytes=bound,
                        greedy_arena_bytes=greedy_arena, solver=solver, status=status,
                        solve_seconds=time.perf_counter() - started)


def _solve_mip(buffers: List[Buffer], pairs, big_m: int, bound: int, time_limit_seconds: float) -> Dict:
    """Integer offsets in units of ALIGN_BYTES (sizes are aligned), so the solution is exact, not rounded. The arena
    starts at the lower bound (`bound`): the relaxation alone proves little, so a solver that reached the bound
    would otherwise search on until its time limit (5 s for an 11-buffer step layout)."""
    assert all(b.size_bytes % ALIGN_BYTES == 0 for b in buffers), "layout buffers must be aligned"
    units = [b.size_bytes // ALIGN_BYTES for b in buffers]
    limit = big_m // ALIGN_BYTES
    problem = pulp.LpProblem("memory_layout", pulp.LpMinimize)
    offset = [problem.add_variable(f"o{i}", 0, limit - u, cat="Integer") for i, u in enumerate(units)]
    arena = problem.add_variable("arena", -(-bound // ALIGN_BYTES), limit)
    problem += arena
    for i, u in enumerate(units):
        problem += offset[i] + u <= arena
    for i, j in pairs:
        below = problem.add_variable(f"z{i}_{j}", cat="Binary")  # 1: i sits below j
        problem += offset[i] + units[i] <= offset[j] + limit * (1 - below)
        problem += offset[j] + units[j] <= offset[i] + limit * below
    solver = make_solver(time_limit_seconds)
    solve_quietly(problem, solver)
    values = [v.value() for v in offset]
    found: Optional[Dict[int, int]] = None
    if all(v is not None for v in values):
        found = {i: int(round(v)) * ALIGN_BYTES for i, v in enumerate(values)}
        if not _valid(buffers, found):
            found = None
    return {"offsets": found, "solver": solver_name(solver), "status": status_name(problem)}


def _valid(buffers: Sequence[Buffer], offsets: Dict[int, int]) -> bool:
    for i, j in itertools.combinations(range(len(buffers)), 2):
        if buffers[i].overlaps_in_time(buffers[j]):
            if offsets[i] < offsets[j] + buffers[j].size_bytes and offsets[j] < offsets[i] + buffers[i].size_bytes:
                return False
    return all(v >= 0 for v in offsets.values())
