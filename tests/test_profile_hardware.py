"""`longtrain profile hardware`: the profile it writes loads back, the CPU run measures positive rates and the
layer's real saved bytes, and a failing measurement is recorded as skipped instead of stopping the run."""

import pytest
import torch
import yaml

from launch.cli import main
from launch.measure.hardware import Measurement, settings_for
from launch.profile_hardware_command import profile_mapping
from spec.config import load_job_config
from planner.cost_model import CostModel, fitted_layer_overhead
from spec.activations import layer_saved_tensors
from spec.hardware import load_profile
from tests.conftest import requires_gpu


def _measurement() -> Measurement:
    result = Measurement()
    result.measured.update({
        "_memory": {"device_memory_gib": 79.1, "host_memory_gib": 251.0}, "matmul_bf16_tflops": 700.0,
        "matmul_fp32_tflops": 50.0, "attention_fwd_bwd_tflops_by_seq_len": {8192: 480.0, 32768: 550.0},
        "layer_fwd_bwd_tflops_by_seq_len": {16384: 520.0}, "layer_saved_bytes_per_token": 153728.0,
        "pcie_pinned_gbps_h2d": 55.0, "pcie_pinned_gbps_d2h": 53.0, "pcie_pinned_gbps_both_ways": 90.0,
        "pcie_pageable_gbps_h2d": 14.0, "pcie_pageable_gbps_d2h": 12.0, "pcie_pageable_gbps_both_ways": 20.0})
    result.skipped["nccl"] = "1 GPU visible"
    return result


def test_profile_format_round_trips(tmp_path):
    model = load_job_config(None, ["model.preset=llama-7b"]).model
    mapping = profile_mapping("h100_test", "NVIDIA H100 80GB HBM3", load_profile("h100_sxm"), True, 1, model,
                              _measurement())
    path = tmp_path / "h100_test.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    profile = load_profile(path)
    assert (profile.name, profile.device_kind, profile.devices_per_node) == ("h100_test", "cuda", 1)
    assert (profile.device_memory_gib, profile.peak_bf16_tflops) == (79.1, 989.0)  # peak from the shipped profile
    measured = profile.measured
    assert measured.attention_fwd_bwd_tflops_by_seq_len == {8192: 480.0, 32768: 550.0}
    assert measured.pcie_pinned_gbps_each_way == 53.0 and measured.pcie_pageable_gbps == 12.0  # the slower way
    assert measured.skipped == {"nccl": "1 GPU visible"} and measured.layer_shape["hidden_size"] == 4096
    assert "measured" in profile.source and "torch" in profile.source


def test_cpu_quick_run_writes_a_loadable_profile_with_positive_rates(tmp_path, capsys):
    out = tmp_path / "cpu_measured.yaml"
    assert main(["profile", "hardware", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GFLOP/s" in printed and "bytes/token" in printed and f"wrote {out}" in printed
    profile = load_profile(out)
    measured = profile.measured
    assert profile.device_kind == "cpu" and measured.rates_precision == "fp32"
    assert measured.matmul_fp32_tflops > 0 and measured.matmul_bf16_tflops > 0
    settings = settings_for(False, True)
    assert sorted(measured.attention_fwd_bwd_tflops_by_seq_len) == settings.attention_seq_lens
    assert all(v > 0 for v in measured.attention_fwd_bwd_tflops_by_seq_len.values())
    assert all(v > 0 for v in measured.layer_fwd_bwd_tflops_by_seq_len.values())
    assert sorted(measured.token_scoring_tflops_by_seq_len) == settings.attention_seq_lens
    assert all(v > 0 for v in measured.token_scoring_tflops_by_seq_len.values())
    debug = load_job_config(None, []).model
    predicted = sum(t.bytes_per_token for t in layer_saved_tensors(debug, 4))
    assert measured.layer_saved_bytes_per_token == pytest.approx(predicted, rel=0.05)
    assert _skipped_but_cpu_adam_unbuilt(measured) == {"pcie", "nccl", "attention_fa4"}
    assert "CUDA" in measured.skipped["attention_fa4"]
    assert profile.host_memory_gib > 0 and profile.device_memory_gib > 0
    # the planner can use it: its layer overhead comes from the measured (debug-shaped, fp32) layer
    overhead = fitted_layer_overhead(profile)
    assert overhead.attention_factor > 0 and overhead.seconds_per_token >= 0
    job = load_job_config(None, ["data.seq_len=512"])
    assert CostModel(job, profile, "fp32").layer().forward_seconds > 0


def test_a_failing_measurement_is_recorded_as_skipped(capsys):
    result = Measurement()

    def broken():
        raise RuntimeError("CUDA error: out of memory\nmore")

    result.attempt("attention_131072", broken)
    result.attempt("fine", lambda: result.measured.update(matmul_bf16_tflops=1.0))
    assert result.skipped == {"attention_131072": "RuntimeError: CUDA error: out of memory"}
    assert result.measured == {"matmul_bf16_tflops": 1.0}


def test_out_must_be_a_yaml_path(tmp_path, capsys):
    assert main(["profile", "hardware", "--quick", "--out", str(tmp_path / "profile.txt")]) == 2
    assert "must be a .yaml file path" in capsys.readouterr().err


@pytest.mark.gpu
@requires_gpu
def test_gpu_quick_run_measures_every_rate(tmp_path):
    import torch

    out = tmp_path / "gpu_measured.yaml"
    assert main(["profile", "hardware", "--quick", "--out", str(out)]) == 0
    profile = load_profile(out)
    measured = profile.measured
    from orchestrator import attention_fa4

    expected_skips = {"nccl"} if torch.cuda.device_count() < 2 else set()
    if attention_fa4.unavailable(torch.device("cuda"), torch.bfloat16) is not None:
        expected_skips.add("attention_fa4")
    else:
        assert min(measured.attention_tflops_by_kernel["fa4"].values()) > 50
    by_kernel = measured.attention_tflops_by_kernel
    assert set(by_kernel["sdpa"]) == set(by_kernel["sdpa_cudnn"]) == set(measured.attention_fwd_bwd_tflops_by_seq_len)
    assert _skipped_but_cpu_adam_unbuilt(measured) == expected_skips, measured.skipped
    assert measured.matmul_bf16_tflops > 50 and measured.matmul_fp32_tflops > 5
    assert min(measured.attention_fwd_bwd_tflops_by_seq_len.values()) > 50
    scoring = measured.token_scoring_tflops_by_seq_len  # the Triton kernel: 188-206 TFLOP/s on an H200
    assert set(scoring) == set(measured.attention_fwd_bwd_tflops_by_seq_len) and min(scoring.values()) > 20
    assert measured.pcie_pinned_gbps_each_way > 1 and measured.pcie_pinned_gbps_both_ways > 1
    llama = load_job_config(None, ["model.preset=llama-7b"]).model
    predicted = sum(t.bytes_per_token for t in layer_saved_tensors(llama, 2))
    assert measured.layer_saved_bytes_per_token == pytest.approx(predicted, rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (NCCL all-to-all; run on a lent multi-GPU machine)")
def test_gpu_alltoall_probe_is_what_the_planner_counts():
    """The NCCL probe's all-to-all bus bandwidth, written as a measured rate (no `derived` entry), is the one a
    sequence-parallel plan counts, and its source says measured."""
    import dataclasses

    from launch.measure.hardware import measure_nccl

    result = Measurement()
    measure_nccl(result, 2, 64 * 2**20, 3)
    rate = result.measured["alltoall_busbw_gbps"]
    assert rate > 10, rate  # NVLink or PCIe between two GPUs of one host: tens to hundreds of GB/s
    shipped = load_profile("h200")
    profile = dataclasses.replace(shipped, measured=dataclasses.replace(shipped.measured, alltoall_busbw_gbps=rate,
                                                                        derived={}))
    job = load_job_config(None, ["model.preset=llama-7b", "data.seq_len=131072", "data.micro_batch_size=1",
                                 "cluster.num_workers=2", "parallel.sp_degree=2"])
    cost = CostModel(job, profile)
    assert cost.exchange_seconds() == pytest.approx(cost.exchange_bytes() / (rate * 1e9))
    assert cost.alltoall_source().startswith(f"{rate:g} GB/s bus bandwidth, measured")


def _skipped_but_cpu_adam_unbuilt(measured):
    """The skipped measurements, less DeepSpeed's CPU Adam where it is not built yet (its first use builds it, for
    minutes; a fresh machine has not trained with an offloaded optimizer), which must say so."""
    skipped = dict(measured.skipped)
    if "cpu_adam" in skipped:
        assert "not built here" in skipped.pop("cpu_adam")
    return set(skipped)
