"""`longtrain profile hardware [CONFIG] [key=value ...] [--out PATH] [--quick]`: run the measurements of
`launch.measure.hardware` on this machine and write a hardware profile YAML that `load_profile` reads."""

import time
from pathlib import Path
from typing import List, Optional

import yaml

from launch.measure.hardware import (Measurement, cpu_name, host_name, measure_attention, measure_attention_kernels,
                                     measure_copies, measure_cpu_adam, measure_layer, measure_matmul, measure_memory,
                                     measure_nccl, measure_token_scoring, optional_min, settings_for)
from launch.paths import check_writable_file

CPU_ADAM_PARAMS = 50_000_000
"""Parameters of the CPU Adam measurement (200 MB in fp32: a few steps of well over a second's worth of work)."""
from spec.errors import LongtrainError


def run_profile_hardware(config_path: Optional[str], overrides: List[str], out: Optional[str], quick: bool,
                         force: bool = False) -> int:
    import torch

    from spec.hardware import detect_profile_name, load_profile

    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if cuda else cpu_name()
    shipped = load_profile(detect_profile_name(device_name if cuda else None))
    model = _model_shape(config_path, overrides, cuda)
    path = Path(out) if out else Path("profiles/hardware") / f"{shipped.name}_measured.yaml"
    if path.suffix not in (".yaml", ".yml"):
        raise LongtrainError(f"--out {path} must be a .yaml file path, e.g. profiles/hardware/h100_sxm_measured.yaml")
    check_writable_file(path, "--out" if out else "the profile file")
    check_not_shipped(path, force)
    num_gpus = torch.cuda.device_count() if cuda else 0
    where = f"CUDA, {num_gpus} GPU(s) visible" if cuda else "CPU"
    print(f"longtrain profile hardware: {device_name} ({where}), torch {torch.__version__}, layer hidden "
          f"{model.hidden_size} x {model.num_heads} heads{', quick' if quick else ''}", flush=True)
    started = time.perf_counter()
    result = measure_all(cuda, quick, model, num_gpus)
    profile = profile_mapping(path.stem, device_name, shipped, cuda, num_gpus, model, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(profile, sort_keys=False, width=120))
    load_profile(path)  # what we wrote must load
    skipped = "".join(f"\n  skipped {name}: {why}" for name, why in result.skipped.items())
    print(f"measured in {time.perf_counter() - started:.0f} s; wrote {path}{skipped}")
    return 0


def check_not_shipped(path: Path, force: bool) -> None:
    """A shipped hardware profile (profiles/hardware/, which plans and MFU of every user read) is replaced only with
    --force: measuring a laptop with --out profiles/hardware/h100_sxm.yaml must not quietly rewrite the H100's."""
    from spec.resources import HARDWARE_PROFILES_DIR

    if force or not path.is_file() or path.resolve().parent != HARDWARE_PROFILES_DIR.resolve():
        return
    raise LongtrainError(f"--out {path} is a shipped hardware profile; write to another file (e.g. "
                         f"{path.with_name(path.stem + '_mine.yaml')}) or pass --force to replace it")


def _model_shape(config_path: Optional[str], overrides: List[str], cuda: bool):
    """The configured model's shape; without a config or model.* override: Llama-7B on a GPU, debug on CPU."""
    from spec.config import load_job_config

    if config_path is None and not any(o.startswith("model.") for o in overrides):
        overrides = [f"model.preset={'llama-7b' if cuda else 'debug'}"] + list(overrides)
    return load_job_config(config_path, overrides).model


def measure_all(cuda: bool, quick: bool, model, num_gpus: int) -> Measurement:
    import torch

    settings = settings_for(cuda, quick)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    result = Measurement()
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # the CPU profile describes one core per worker, as its peak does
    try:
        if cuda:
            torch.cuda.set_device(device)
        result.attempt("memory", lambda: result.measured.update(_memory=measure_memory(result, cuda)))
        for precision in ("bf16", "fp32"):
            result.attempt(f"matmul_{precision}",
                           lambda p=precision: measure_matmul(result, device, p, settings.matmul_size,
                                                              settings.repeats))
        for seq in settings.attention_seq_lens:
            result.attempt(f"attention_{seq}", lambda s=seq: measure_attention(
                result, device, dtype, s, settings.attention_heads, settings.attention_head_dim, settings.repeats))
        result.attempt("attention_kernels", lambda: measure_attention_kernels(
            result, device, dtype, settings.attention_seq_lens, settings.attention_heads,
            settings.attention_head_dim, settings.repeats))
        result.attempt("token_scoring", lambda: measure_token_scoring(
            result, device, dtype, settings.attention_seq_lens, settings.attention_heads,
            settings.attention_head_dim, settings.repeats))
        for i, seq in enumerate(settings.layer_seq_lens):
            result.attempt(f"layer_{seq}", lambda s=seq, first=i == 0: measure_layer(
                result, device, dtype, model, s, settings.repeats, saved_bytes=first))
        _measure_links(result, cuda, num_gpus, settings)
        torch.set_num_threads(threads)  # DeepSpeed's CPU Adam uses the host's cores, as it does in training
        result.attempt("cpu_adam", lambda: measure_cpu_adam(result, CPU_ADAM_PARAMS, settings.repeats))
    finally:
        torch.set_num_threads(threads)
    return result


def _measure_links(result: Measurement, cuda: bool, num_gpus: int, settings) -> None:
    import torch

    if not cuda:
        result.skipped["pcie"] = "no CUDA device: host and device are the same memory"
        result.skipped["nccl"] = "no CUDA device"
        return
    device = torch.device("cuda", 0)
    for pinned in (True, False):
        result.attempt("pcie_pinned" if pinned else "pcie_pageable",
                       lambda p=pinned: measure_copies(result, device, settings.copy_bytes, settings.repeats, p))
    if num_gpus >= 2:
        result.attempt("nccl", lambda: measure_nccl(result, num_gpus, settings.nccl_bytes, settings.repeats))
    else:
        result.skipped["nccl"] = f"{num_gpus} GPU visible; all-reduce and all-to-all need at least 2"
        result.report("NCCL all-reduce / all-to-all", "skipped (one GPU)")


def profile_mapping(name: str, device_name: str, shipped, cuda: bool, num_gpus: int, model, result: Measurement):
    """The profile as a mapping in the shipped files' order; peaks from the shipped profile of this device kind."""
    import torch

    measured = dict(result.measured)
    memory = measured.pop("_memory", None) or {"device_memory_gib": shipped.device_memory_gib,
                                               "host_memory_gib": shipped.host_memory_gib}
    if "_memory" not in result.measured:
        result.skipped.setdefault("memory", "not measured; the shipped profile's values are kept")
    measured["rates_precision"] = "bf16" if cuda else "fp32"
    measured["layer_shape"] = {k: getattr(model, k) for k in ("hidden_size", "num_heads", "num_kv_heads",
                                                               "intermediate_size")}
    measured["pcie_pinned_gbps_each_way"] = optional_min(measured.get("pcie_pinned_gbps_h2d"),
                                                         measured.get("pcie_pinned_gbps_d2h"))
    measured["pcie_pinned_gbps_both_ways"] = measured.pop("pcie_pinned_gbps_both_ways", None)
    measured["pcie_pageable_gbps"] = optional_min(measured.get("pcie_pageable_gbps_h2d"),
                                                  measured.get("pcie_pageable_gbps_d2h"))
    measured["skipped"] = dict(result.skipped)
    measured = {k: v for k, v in measured.items() if v is not None}
    what = device_name if cuda else f"{device_name}, one core per worker (measured with 1 thread)"
    return {
        "name": name, "description": what,
        "source": f"measured {time.strftime('%Y-%m-%d')} by longtrain profile hardware on {host_name()}, "
                  f"torch {torch.__version__}; peaks from the shipped {shipped.name} profile",
        "device_kind": "cuda" if cuda else "cpu",
        "devices_per_node": num_gpus if cuda else shipped.devices_per_node,
        **memory, "peak_bf16_tflops": shipped.peak_bf16_tflops, "peak_fp32_tflops": shipped.peak_fp32_tflops,
        "measured": measured,
    }
