"""Hardware profiles: the measured and datasheet facts a plan and an MFU figure are computed against.

Why files, not constants: a plan made on a laptop must name the machine it was made for, and `longtrain
profile hardware` replaces datasheet guesses by measurements without touching code. Field names carry units.
"""

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Optional, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spec.errors import ProfileError
from spec.resources import HARDWARE_PROFILES_DIR as PROFILES_DIR
from spec.yamlio import read_yaml

GPU_NAME_TO_PROFILE = (("H200", "h200"), ("H100", "h100_sxm"), ("A800", "a800"), ("A100", "a100_80g"))


@dataclass
class MeasuredRates:
    """Achieved rates on this hardware (empty for a datasheet-only profile)."""

    matmul_bf16_tflops: Optional[float] = None
    attention_fwd_bwd_tflops_by_seq_len: Dict[int, float] = field(default_factory=dict)
    layer_fwd_bwd_tflops_by_seq_len: Dict[int, float] = field(default_factory=dict)
    layer_saved_bytes_per_token: Optional[float] = None
    pcie_pinned_gbps_each_way: Optional[float] = None
    pcie_pinned_gbps_both_ways: Optional[float] = None
    pcie_pageable_gbps: Optional[float] = None
    # Written by `longtrain profile hardware` (older profiles leave them out):
    matmul_fp32_tflops: Optional[float] = None
    rates_precision: str = "bf16"
    """Precision of the attention and layer tables (a CPU profile measures fp32, what CPU training runs)."""
    layer_shape: Dict[str, int] = field(default_factory=dict)
    """hidden_size, num_heads, num_kv_heads, intermediate_size of the measured layer; empty: Llama-7B."""
    pcie_pinned_gbps_h2d: Optional[float] = None
    pcie_pinned_gbps_d2h: Optional[float] = None
    pcie_pageable_gbps_h2d: Optional[float] = None
    pcie_pageable_gbps_d2h: Optional[float] = None
    pcie_pageable_gbps_both_ways: Optional[float] = None
    allreduce_busbw_gbps: Optional[float] = None
    alltoall_busbw_gbps: Optional[float] = None
    skipped: Dict[str, str] = field(default_factory=dict)
    """Measurements that did not run on this machine, with the reason."""
    attention_kernel_speedup: Dict[str, float] = field(default_factory=dict)
    """train.attention_kernel other than sdpa -> its forward + backward attention rate over SDPA's at one length
    (measured side by side: `docs/probes/fa4_attention_gpu.py`), for profiles without `attention_tflops_by_kernel`;
    the cost model scales SDPA's rates by it. A kernel missing from both is priced at SDPA's rates."""
    attention_tflops_by_kernel: Dict[str, Dict[int, float]] = field(default_factory=dict)
    """Causal attention forward + backward (causal FLOPs halved) per kernel and length, on the model's layout:
    train.attention_kernel's choices (sdpa, fa4) and, for the record, SDPA's own backends (sdpa_cudnn, sdpa_flash).
    Written by `longtrain profile hardware`; `train.attention_kernel=auto` takes the fastest at the job's length,
    and the cost model prices a kernel at its own row."""
    token_scoring_tflops_by_seq_len: Dict[int, float] = field(default_factory=dict)
    """Token elimination's exact block scoring (LeMo's tile maxima, `orchestrator/memory/token_elim_triton.py` on a
    GPU): q.k FLOPs of the causal pairs per second (`spec.flops.block_scoring_flops_per_token`), per length,
    32 heads x 128. Written by `longtrain profile hardware`; the kernel reduces each tile in registers and runs at
    well under flash attention's rate (0.4x on an H200), so it has its own row."""
    cpu_adam_params_per_second: Optional[float] = None
    """DeepSpeed's CPU Adam (the offloaded optimizer's step) on this host: parameters updated per second."""
    derived: Dict[str, str] = field(default_factory=dict)
    """Rates above that were not measured on this hardware but derived from measured runs, each with the file it
    came from and the arithmetic (e.g. the all-to-all bandwidth from a sequence-parallel run's step time until
    `longtrain profile hardware` measures it on a machine with several GPUs, which writes no entry here)."""

    def attention_rate(self, kernel: str, seq_len: int) -> float:
        """A kernel's measured causal forward + backward TFLOP/s at this length: its own row, else SDPA's table
        scaled by its one-length speedup (sdpa: 1); 0 where nothing was measured for it."""
        own = self.attention_tflops_by_kernel.get(kernel)
        if own:
            return interpolate_log(own, seq_len)
        if kernel != "sdpa" and kernel not in self.attention_kernel_speedup:
            return 0.0
        return (interpolate_log(self.attention_fwd_bwd_tflops_by_seq_len, seq_len)
                * self.attention_kernel_speedup.get(kernel, 1.0))


def interpolate_log(table: Dict[int, float], x: float) -> float:
    """Piecewise-linear in log(x) through a {x: value} table, clamped at its ends; 0 for an empty table."""
    if not table:
        return 0.0
    points = sorted((int(k), float(v)) for k, v in table.items())
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return points[-1][1]


@dataclass
class Calibration:
    """Factors fitted to measured runs (`longtrain profile calibrate`); the defaults change nothing.

    The cost model multiplies a layer's matmul and attention seconds by the time factors; a plan's predicted
    peak is static + peak_memory_factor x activation arena + peak_memory_offset_gib."""

    matmul_time_factor: float = 1.0
    attention_time_factor: float = 1.0
    peak_memory_factor: float = 1.0
    peak_memory_offset_gib: float = 0.0
    source: str = ""


@dataclass
class HardwareProfile:
    name: str
    description: str
    source: str
    device_kind: str
    devices_per_node: int
    device_memory_gib: float
    host_memory_gib: float
    peak_bf16_tflops: float
    peak_fp32_tflops: float
    measured: MeasuredRates = field(default_factory=MeasuredRates)
    calibration: Calibration = field(default_factory=Calibration)
    host_memory_source: str = "datasheet"
    """Where host_memory_gib comes from: datasheet (a machine of this kind, right only when planning for another
    machine; plans say so), or the machine's own figure (a lent machine's stated size); measured profiles say
    "measured" in `source`."""

    def peak_tflops(self, precision: str) -> float:
        """Peak per device for the training precision (bf16 or fp32)."""
        return self.peak_bf16_tflops if precision == "bf16" else self.peak_fp32_tflops


def load_profile(name_or_path: Union[str, Path]) -> HardwareProfile:
    """A profile by name (profiles/hardware/NAME.yaml) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ProfileError(f"hardware profile {name_or_path!r} not found ({path}); known profiles: {known}")
    raw = read_yaml(path, "hardware profile", ProfileError, "fix the file or measure one with `longtrain profile "
                                                             "hardware`")
    return _from_mapping(raw or {}, path)


def detect_profile_name(cuda_device_name: Optional[str]) -> str:
    """The shipped profile for a CUDA device name, `cpu` without CUDA; unknown GPUs fall back to h100_sxm."""
    if cuda_device_name is None:
        return "cpu"
    for marker, name in GPU_NAME_TO_PROFILE:
        if marker in cuda_device_name:
            return name
    return "h100_sxm"


def _from_mapping(raw: dict, path: Path) -> HardwareProfile:
    _check_mapping(raw, path, "")
    measured = raw.pop("measured", None) or {}
    calibration = raw.pop("calibration", None) or {}
    _check_mapping(measured, path, "measured")
    _check_mapping(calibration, path, "calibration")
    _check_keys(raw, HardwareProfile, path, "")
    _check_keys(measured, MeasuredRates, path, "measured.")
    _check_keys(calibration, Calibration, path, "calibration.")
    missing = [f.name for f in fields(HardwareProfile) if f.name not in raw and f.name not in ("measured",
                                                                                                  "calibration",
                                                                                                  "host_memory_source")]
    if missing:
        raise ProfileError(f"hardware profile {path} lacks {', '.join(missing)}; add them (units in the names)")
    return _typed(HardwareProfile, {**raw, "measured": measured, "calibration": calibration}, path)


def _check_mapping(raw, path: Path, section: str) -> None:
    if not isinstance(raw, dict):
        where = f"its section {section}" if section else "it"
        raise ProfileError(f"hardware profile {path}: {where} must be a mapping of 'key: value' lines, not "
                           f"{type(raw).__name__} {raw!r:.40}")


def _typed(schema: type, raw: dict, path: Path):
    """`raw` as the dataclass `schema`, each value checked against its field's type by OmegaConf."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        message = str(error).strip().splitlines()[0]
        raise ProfileError(f"hardware profile {path}: {key} has a value of the wrong type ({message}); "
                           "fix it (units in the key's name)") from error


def _check_keys(raw: dict, schema: type, path: Path, prefix: str) -> None:
    known = {f.name for f in fields(schema)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ProfileError(f"hardware profile {path} has unknown key {prefix}{unknown[0]}; "
                           f"known keys: {', '.join(sorted(known))}")
