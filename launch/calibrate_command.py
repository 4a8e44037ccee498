"""`longtrain profile calibrate BENCH_JSON... [--profile NAME] [--out DIR]`: the planner's step time and peak
against `longtrain bench` measurements, before and after fitting the profile's calibration factors; writes a
Markdown report and the calibrated profile (the shipped one plus a `calibration:` section) into DIR."""

import re
import time
from pathlib import Path
from typing import List, Optional, Sequence

import yaml

from launch.paths import check_writable_dir
from spec.errors import LongtrainError
from launch.measure.calibration import BenchObservation, Prediction, fit, predict, read_bench_rows, \
    resolve_decisions, with_calibration
from spec.hardware import Calibration, HardwareProfile, load_profile

STEP_GOAL, PEAK_GOAL = 0.10, 0.05
"""Issue 9's goal: predicted step time within 10% and peak memory within 5% of the measurement."""


def run_profile_calibrate(paths: Sequence[str], profile_name: Optional[str], out: str) -> int:
    check_writable_dir(out, "--out")
    rows, profiles, left_out = read_bench_rows(paths)
    profile = load_profile(profile_name or _one_profile(profiles))
    before = [resolve_decisions(row, profile) for row in rows]
    command = "longtrain profile calibrate " + " ".join(paths) + (f" --profile {profile_name}" if profile_name else "")
    calibration, notes = fit(rows, profile, source=f"fitted {time.strftime('%Y-%m-%d')} by `{command}` "
                                            f"on {len(rows)} bench rows")
    calibrated = with_calibration(profile, calibration)
    after = [predict(row.seq_len, row.num_layers, row.decisions, calibrated) for row in rows]
    report = calibration_report(rows, before, after, profile, calibration, command, left_out, notes)
    stem = Path(out) / f"{profile.name}_{time.strftime('%Y-%m-%d')}_calibration"
    stem.parent.mkdir(parents=True, exist_ok=True)
    profile_path = stem.parent / f"{profile.name}_{time.strftime('%Y-%m-%d')}_calibrated.yaml"
    profile_path.write_text(calibrated_profile_text(profile, calibration))
    load_profile(profile_path)  # what we wrote must load
    stem.with_suffix(".md").write_text(report + f"\nCalibrated profile: `{profile_path}` (load it with "
                                                f"`--profile {profile_path}`).\n")
    print(report)
    print(f"wrote {stem}.md and {profile_path}")
    return 0


def _one_profile(profiles: List[str]) -> str:
    names = sorted(set(p for p in profiles if p))
    if len(names) != 1:
        raise LongtrainError(f"the bench files name profiles {names or 'none'}; calibrate one machine at a time "
                             "or pass --profile NAME")
    return names[0]


def calibration_report(rows: Sequence[BenchObservation], before: Sequence[Prediction], after: Sequence[Prediction],
                       profile: HardwareProfile, calibration: Calibration, command: str, left_out: List[str],
                       notes: Sequence[str] = ()) -> str:
    lines = [f"# Calibration of the {profile.name} profile against longtrain bench rows", "",
             f"Command: `{command}`", "",
             "Each row is predicted for the plan it ran (from its note) with the bench's accounting (layers only). "
             "*recorded*: the prediction written at run time; *before*: today's planner with the uncalibrated "
             "profile; *after*: with the fitted factors. Errors are predicted / measured - 1. "
             f"Goal: step within {STEP_GOAL:.0%}, peak within {PEAK_GOAL:.0%}.", "",
             "| file | mode | seq | plan (keep/swap/recompute/host per layer) | step s | recorded | before | after "
             "| peak GiB | recorded | before | after |", "|" + " --- |" * 12]
    for row, b, a in zip(rows, before, after):
        plan = ", ".join(f"{d.keep_fraction:.2f}/{d.swap_fraction:.2f}/{d.recompute_fraction:.2f}/"
                         f"{'H' if d.offload_skeletal else '-'}" for d in row.decisions)
        lines.append(f"| {row.source} | {row.mode} | {row.seq_len} | {plan} | {row.step_seconds:.3f} | "
                     f"{_error(row.recorded_step_seconds, row.step_seconds)} | "
                     f"{_error(b.step_seconds, row.step_seconds)} | {_error(a.step_seconds, row.step_seconds)} | "
                     f"{row.peak_gib:.2f} | {_error(row.recorded_peak_gib, row.peak_gib)} | "
                     f"{_error(b.peak_gib, row.peak_gib)} | {_error(a.peak_gib, row.peak_gib)} |")
    lines += ["", "| | step: max abs error | step: rows within goal | peak: max abs error | peak: rows within goal |",
              "| --- | --- | --- | --- | --- |"]
    recorded = ([r.recorded_step_seconds for r in rows], [r.recorded_peak_gib for r in rows])
    for label, step, peak in (("recorded", *recorded),
                              ("before", [p.step_seconds for p in before], [p.peak_gib for p in before]),
                              ("after", [p.step_seconds for p in after], [p.peak_gib for p in after])):
        step_errors = [abs(s / r.step_seconds - 1) for s, r in zip(step, rows)]
        peak_errors = [abs(s / r.peak_gib - 1) for s, r in zip(peak, rows)]
        lines.append(f"| {label} | {max(step_errors):.1%} | {sum(e <= STEP_GOAL for e in step_errors)}/{len(rows)} "
                     f"| {max(peak_errors):.1%} | {sum(e <= PEAK_GOAL for e in peak_errors)}/{len(rows)} |")
    lines += ["", "Fitted factors (least squares on relative errors; kept only where they lower the largest "
              "error):", "",
              f"- `matmul_time_factor` {calibration.matmul_time_factor} and `attention_time_factor` "
              f"{calibration.attention_time_factor}: multiply the layer's matmul and attention seconds (on top of "
              f"the profile's layer overhead)",
              f"- `peak_memory_factor` {calibration.peak_memory_factor} and `peak_memory_offset_gib` "
              f"{calibration.peak_memory_offset_gib}: peak = static + factor x activation arena + offset"]
    lines += [f"- {note}" for note in notes]
    if left_out:
        lines += ["", "Rows left out:", ""] + [f"- {why}" for why in left_out]
    return "\n".join(lines) + "\n"


def _error(predicted: float, measured: float) -> str:
    return f"{predicted / measured - 1:+.1%}"


def calibrated_profile_text(profile: HardwareProfile, calibration: Calibration) -> str:
    """The profile's own file (comments kept) renamed `<name>_calibrated`, with a `calibration:` section."""
    source = Path(profile_path_of(profile))
    text = source.read_text()
    raw = yaml.safe_load(text) or {}
    section = yaml.safe_dump({"calibration": vars(calibration)}, sort_keys=False, width=120)
    if "calibration" in raw:
        raw["calibration"] = vars(calibration)
        raw["name"] = f"{profile.name}_calibrated"
        return yaml.safe_dump(raw, sort_keys=False, width=120)
    text = re.sub(r"^name:.*$", f"name: {profile.name}_calibrated", text, count=1, flags=re.MULTILINE)
    return text.rstrip("\n") + "\n" + section


def profile_path_of(profile: HardwareProfile) -> Path:
    from spec.hardware import PROFILES_DIR

    path = getattr(profile, "path", None)
    return Path(path) if path else PROFILES_DIR / f"{profile.name}.yaml"
