"""Calibrate a hardware profile against `longtrain bench` runs: predict each measured longtrain row with the real
cost model and layout, fit the profile's `calibration:` factors by least squares, predict again with them.

What a row is predicted as: the bench's own accounting (`launch.measure.bench._apply_longtrain_plan`) for the plan
that row ran - layers only (LM head time and optimizer, buffers, embedding and LM-head memory left out). The plan
is read from the row's note ("plan keep/swap/recompute/skeletal-host: K/S/R/OFFLOAD; ..."), not re-planned,
because the planner has changed since most runs were measured and a different plan costs differently. When the
note lists several groups of layers, the assignment of groups to layers whose prediction with the uncalibrated
profile is nearest the prediction recorded at run time is taken (the note does not say which layer had which).

Time model (per step, this plan): seconds = a x matmul part + b x attention part + host-copy stalls, where the
matmul part is every layer's forward + backward projections plus the recomputed share, the attention part the
causal attention forward + backward; a = calibration.matmul_time_factor, b = calibration.attention_time_factor.
Memory model: peak = weights + gradients + f x activation arena (the plan's layout) + offset;
f = calibration.peak_memory_factor, offset = calibration.peak_memory_offset_gib.
Both fits minimise the squared relative errors; the stalls depend on a and b, so the time fit is iterated.
"""

import copy
import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from spec.config import load_job_config
from spec.errors import LongtrainError
from planner.cost_model import CostModel, calibrated_peak_bytes
from spec.hardware import Calibration, HardwareProfile
from spec.plan import LayerPlan
from planner.layout import solve_layout
from planner.policy import given_copies, policy_inputs
from planner.schedule import keeps_everything, layer_block_buffers, step_buffers
from spec.units import GIB

LAYOUT_SECONDS = 10.0


@dataclass
class BenchObservation:
    """One measured longtrain row of a bench JSON, with the plan it ran (one decision per layer)."""

    source: str
    mode: str
    seq_len: int
    num_layers: int
    step_seconds: float
    peak_gib: float
    recorded_step_seconds: float
    recorded_peak_gib: float
    groups: List[Tuple[float, float, float, bool]]
    decisions: List[LayerPlan] = field(default_factory=list)


@dataclass
class Prediction:
    step_seconds: float
    peak_gib: float
    matmul_seconds: float
    """The matmul part of step_seconds (projections forward + backward + recompute), calibration applied."""
    attention_seconds: float
    stall_seconds: float
    fixed_gib: float
    """Weights and gradients of the layers less the LM-head buffers the arena holds (the bench has no head)."""
    arena_gib: float


def read_bench_rows(paths: Sequence[str]) -> Tuple[List[BenchObservation], List[str], List[str]]:
    """Longtrain rows with status ok and recorded predictions, the profiles the files name, and why other rows
    were left out."""
    rows, profiles, left_out = [], [], []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise LongtrainError(f"bench JSON {path} not found; pass files written by `longtrain bench` "
                                 "(profiles/runs/*_bench-*.json)")
        try:
            data = json.loads(path.read_text())
            meta, file_rows = data["meta"], data["rows"]
        except (ValueError, KeyError, TypeError) as error:
            raise LongtrainError(f"{path} is not a longtrain bench JSON (needs 'meta' and 'rows'): {error}") from error
        profiles.append(meta.get("profile", ""))
        for row in file_rows:
            observation, why = _observation(row, path.name, int(meta.get("layers", 0)))
            if observation:
                rows.append(observation)
            elif why:
                left_out.append(f"{path.name} {row.get('mode')} {row.get('seq_len')}: {why}")
    if not rows:
        raise LongtrainError(f"no longtrain row with status ok and recorded predictions in {', '.join(paths)}; "
                             "run `longtrain bench --modes longtrain,...` (rows of other modes have no prediction)")
    return rows, profiles, left_out


def _observation(row: Dict, source: str, num_layers: int) -> Tuple[Optional[BenchObservation], str]:
    if not str(row.get("mode", "")).startswith("longtrain"):
        return None, ""
    if row.get("status") != "ok":
        return None, f"status {row.get('status')}"
    if not (row.get("predicted_step_seconds") and row.get("predicted_peak_gib")):
        return None, "no predictions recorded (bench before predictions were written)"
    groups = parse_plan_groups(row.get("note", ""))
    if not groups or num_layers < len(groups):
        return None, "the note names no plan (a hand policy or an older bench)"
    return BenchObservation(source, row["mode"], int(row["seq_len"]), num_layers, float(row["step_seconds"]),
                            float(row["peak_allocated_gib"]), float(row["predicted_step_seconds"]),
                            float(row["predicted_peak_gib"]), groups), ""


def parse_plan_groups(note: str) -> List[Tuple[float, float, float, bool]]:
    """'plan keep/swap/recompute/skeletal-host: 0.40/0.00/0.60/True; arena 27.1 GiB' -> [(0.4, 0.0, 0.6, True)]."""
    marker = "plan keep/swap/recompute/skeletal-host:"
    if marker not in note:
        return []
    groups = []
    for part in note.split(marker, 1)[1].split(";"):
        fields = part.strip().split("/")
        if len(fields) != 4 or fields[3] not in ("True", "False"):
            continue
        try:
            keep, swap, recompute = (float(f) for f in fields[:3])
        except ValueError:
            continue
        groups.append((keep, swap, recompute, fields[3] == "True"))
    return groups


def decisions_from(groups: Sequence[Tuple[float, float, float, bool]], assignment: Sequence[int]) -> List[LayerPlan]:
    decisions = []
    for group in assignment:
        keep, swap, recompute, offload = groups[group]
        decisions.append(LayerPlan(len(decisions), keep, swap, recompute, offload))
    return decisions


def assignments(num_groups: int, num_layers: int) -> List[Tuple[int, ...]]:
    """Every way to give each layer one of the groups with every group used."""
    return [a for a in itertools.product(range(num_groups), repeat=num_layers) if len(set(a)) == num_groups]


def bench_job(num_layers: int, seq_len: int, preset: str = "llama-7b", overrides: Sequence[str] = ()):
    """The job `longtrain bench` plans and measures (defined here, where the calibration re-predicts its rows);
    `overrides`: the bench's kernel flags as the job keys they stand for (train.elementwise, ...)."""
    return load_job_config(None, [f"model.preset={preset}", f"model.num_layers={num_layers}",
                                  f"data.seq_len={seq_len}", "data.micro_batch_size=1", "cluster.num_workers=1",
                                  "train.zero_stage=0", "optim.warmup_steps=1", "train.max_steps=2", *overrides])


def not_in_bench_bytes(cost: CostModel, static) -> float:
    """What a plan's peak holds that the bench does not allocate, less what the bench holds that a plan does not.

    The bench runs the layers alone: no optimizer states, buffers, or embedding, final norm and LM head weights and
    gradients (one GPU at ZeRO-0, so none of them partitioned). The head's interval (its loss chunk and the two
    tensors outside the layers) is not in a plan's peak: a plan lays it out in the layer block's room
    (`StaticMemory.head_interval`), which the bench's layers use as well. The bench keeps the gradient it feeds the
    last layer and the last layer's output (the tensor it calls backward on) for the whole step, where a model frees
    the gradient once the last layer has read it and the output with the final norm's backward (both in the head's
    interval; a lent H200's memory trace of a bench row shows both alive at its peak)."""
    model = cost.model
    outer = model.vocab_size * model.hidden_size * (1 if model.tie_embeddings else 2) + model.hidden_size
    hidden_sized = cost.tokens_per_gpu * model.hidden_size * cost.element_bytes
    return static.optimizer_states + static.buffers + 2 * outer * cost.element_bytes - 2 * hidden_sized


def predict(seq_len: int, num_layers: int, decisions: Sequence[LayerPlan], profile: HardwareProfile,
            preset: str = "llama-7b", overrides: Sequence[str] = ()) -> Prediction:
    """The planner's step time and peak for the bench's layers running these per-layer decisions (`overrides`: the
    row's kernel flags, as `bench_job` takes them)."""
    cost = CostModel(bench_job(num_layers, seq_len, preset, overrides), profile)
    layer = cost.layer()
    block = solve_layout(layer_block_buffers(layer), LAYOUT_SECONDS)
    p = replace(policy_inputs(cost, 0, block.arena_bytes), head_seconds=0.0)  # no head: the last layer's
    # backward starts where its forward ends, its copies out still held (`planner.policy.last_layer_fetch_seconds`)
    n = num_layers
    stalls, _ = given_copies(p, decisions)
    recomputed = sum(d.recompute_fraction for d in decisions)
    # a dense layer's forward = matmul + attention parts (the bench job has no token elimination)
    attention_forward = layer.forward_seconds - layer.recompute_seconds
    matmul = n * 3 * layer.recompute_seconds + layer.recompute_seconds * recomputed
    attention = n * 3 * attention_forward
    static = cost.static_memory(0)
    plain = keeps_everything(decisions)
    forward, backward = (solve_layout(layer_block_buffers(layer, plain=plain, part=part), LAYOUT_SECONDS).arena_bytes
                         for part in ("forward", "backward"))
    step = solve_layout(step_buffers([layer] * n, decisions, forward, 0.0, [1.0] * n, head_reuses_block=True,
                                     backward_block_bytes=backward), LAYOUT_SECONDS)  # the bench has no head
    not_in_bench = not_in_bench_bytes(cost, static)
    peak = calibrated_peak_bytes(profile, static.total - static.head_interval, step.arena_bytes) - not_in_bench
    return Prediction(step_seconds=matmul + attention + stalls, peak_gib=peak / GIB, matmul_seconds=matmul,
                      attention_seconds=attention, stall_seconds=stalls,
                      fixed_gib=(static.total - static.head_interval - not_in_bench) / GIB,
                      arena_gib=step.arena_bytes / GIB)


def resolve_decisions(row: BenchObservation, profile: HardwareProfile) -> Prediction:
    """Fill row.decisions (the group assignment nearest the recorded prediction) and return its prediction."""
    best = None
    for assignment in assignments(len(row.groups), row.num_layers):
        decisions = decisions_from(row.groups, assignment)
        prediction = predict(row.seq_len, row.num_layers, decisions, profile)
        distance = (abs(prediction.step_seconds / row.recorded_step_seconds - 1)
                    + abs(prediction.peak_gib / row.recorded_peak_gib - 1))
        if best is None or distance < best[0]:
            best = (distance, decisions, prediction)
        if len(row.groups) == 1:
            break
    row.decisions = best[1]
    return best[2]


def with_calibration(profile: HardwareProfile, calibration: Calibration) -> HardwareProfile:
    calibrated = copy.deepcopy(profile)
    calibrated.calibration = calibration
    return calibrated


def fit_time_factors(rows: Sequence[BenchObservation], profile: HardwareProfile,
                     iterations: int = 4) -> Tuple[float, float]:
    """(matmul_time_factor, attention_time_factor) minimising the squared relative step-time errors; the
    stalls are recomputed with each estimate (they shrink as compute grows)."""
    base = profile.calibration
    matmul_factor, attention_factor = base.matmul_time_factor, base.attention_time_factor
    for _ in range(iterations):
        trial = with_calibration(profile, replace(base, matmul_time_factor=matmul_factor,
                                                  attention_time_factor=attention_factor))
        design, target = [], []
        for row in rows:
            p = predict(row.seq_len, row.num_layers, row.decisions, trial)
            design.append([p.matmul_seconds / matmul_factor / row.step_seconds,
                           p.attention_seconds / attention_factor / row.step_seconds])
            target.append(1.0 - p.stall_seconds / row.step_seconds)
        solution = _least_squares(design, target)
        if min(solution) <= 0:  # not identifiable from these rows: one common factor instead
            common = _least_squares([[a + b] for a, b in design], target)[0]
            solution = [common, common]
        matmul_factor, attention_factor = solution
    return float(matmul_factor), float(attention_factor)


def fit_memory_factors(rows: Sequence[BenchObservation], profile: HardwareProfile) -> Tuple[float, float]:
    """(peak_memory_factor, peak_memory_offset_gib) minimising the squared relative peak errors."""
    plain = with_calibration(profile, replace(profile.calibration, peak_memory_factor=1.0, peak_memory_offset_gib=0.0))
    design, target = [], []
    for row in rows:
        p = predict(row.seq_len, row.num_layers, row.decisions, plain)
        design.append([p.arena_gib / row.peak_gib, 1.0 / row.peak_gib])
        target.append(1.0 - p.fixed_gib / row.peak_gib)
    factor, offset = _least_squares(design, target) if len(rows) >= 2 else (target[0] / design[0][0], 0.0)
    return float(factor), float(offset)


def _least_squares(design: List[List[float]], target: List[float]) -> List[float]:
    solution, *_ = np.linalg.lstsq(np.array(design), np.array(target), rcond=None)
    return [float(x) for x in solution]


def fit(rows: Sequence[BenchObservation], profile: HardwareProfile, source: str = "") -> Tuple[Calibration, List[str]]:
    """Fitted factors, and notes. A fit is kept only where it lowers the largest relative error over the rows (for
    memory an under-prediction means an out-of-memory run, so a fit that trades a few rows for others is not
    worth it); otherwise the profile's own values stay and a note says so."""
    matmul_factor, attention_factor = fit_time_factors(rows, profile)
    memory_factor, offset_gib = fit_memory_factors(rows, profile)
    old = profile.calibration
    fitted = Calibration(matmul_time_factor=round(matmul_factor, 4), attention_time_factor=round(attention_factor, 4),
                         peak_memory_factor=round(memory_factor, 4), peak_memory_offset_gib=round(offset_gib, 3),
                         source=source)
    before, after = max_errors(rows, profile), max_errors(rows, with_calibration(profile, fitted))
    notes = []
    if after[0] >= before[0]:
        notes.append(f"time factors not kept: the fit ({fitted.matmul_time_factor}, {fitted.attention_time_factor}) "
                     f"leaves a largest step error of {after[0]:.1%}, not below {before[0]:.1%}")
        fitted = replace(fitted, matmul_time_factor=old.matmul_time_factor,
                         attention_time_factor=old.attention_time_factor)
    if after[1] >= before[1] or after[2] > before[2]:
        notes.append(f"memory factors not kept: the fit (factor {fitted.peak_memory_factor}, offset "
                     f"{fitted.peak_memory_offset_gib} GiB) gives a largest peak error of {after[1]:.1%} (uncalibrated "
                     f"{before[1]:.1%}) and a largest under-prediction of {after[2]:.1%} (uncalibrated "
                     f"{before[2]:.1%}); it must lower the first without raising the second")
        fitted = replace(fitted, peak_memory_factor=old.peak_memory_factor,
                         peak_memory_offset_gib=old.peak_memory_offset_gib)
    return fitted, notes


def max_errors(rows: Sequence[BenchObservation], profile: HardwareProfile) -> Tuple[float, float, float]:
    """Largest |predicted / measured - 1| of step time and of peak over the rows, and the largest peak
    under-prediction (1 - predicted / measured, 0 when none is under)."""
    predictions = [predict(r.seq_len, r.num_layers, r.decisions, profile) for r in rows]
    peak_errors = [p.peak_gib / r.peak_gib - 1 for p, r in zip(predictions, rows)]
    return (max(abs(p.step_seconds / r.step_seconds - 1) for p, r in zip(predictions, rows)),
            max(abs(e) for e in peak_errors), max([0.0] + [-e for e in peak_errors]))
