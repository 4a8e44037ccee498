"""The planner's cost model against the real model and the profile's measurements."""

import pytest
import torch

from spec.config import load_job_config
from orchestrator.model import DecoderLayer, rope_tables
from launch.measure.hardware import saved_bytes_per_token
from planner.cost_model import CostModel
from spec.hardware import interpolate_log
from spec.activations import layer_saved_tensors
from spec.hardware import load_profile


def _saved_bytes_per_token(model_config, seq_len, dtype):
    """Bytes the layer's autograd graph keeps per token, measured as `longtrain profile hardware` measures it."""
    layer = DecoderLayer(model_config).to(dtype)
    x = torch.randn(1, seq_len, model_config.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(torch.arange(seq_len), model_config.head_dim, 1e4, dtype)
    return saved_bytes_per_token(layer, x, cos, sin)


@pytest.mark.parametrize("dtype,element_bytes", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_saved_tensor_inventory_matches_what_the_layer_saves(dtype, element_bytes):
    job = load_job_config(None, ["model.hidden_size=256", "model.intermediate_size=688"])
    predicted = sum(t.bytes_per_token for t in layer_saved_tensors(job.model, element_bytes))
    measured = _saved_bytes_per_token(job.model, 512, dtype)
    assert measured == pytest.approx(predicted, rel=0.02)


def test_llama7b_layer_matches_the_h100_measurements():
    """Forward time near MEMO's note (0.104 s at 64K on H100) and saved bytes near the probe's 153.7 KB/token."""
    job = load_job_config(None, ["model.preset=llama-7b", "data.seq_len=65536", "data.micro_batch_size=1",
                                 "cluster.num_workers=1"])
    layer = CostModel(job, load_profile("h100_sxm")).layer()
    assert layer.forward_seconds == pytest.approx(0.104, rel=0.2)
    assert (layer.skeletal_bytes + layer.token_wise_bytes) / layer.tokens == pytest.approx(153_700, rel=0.08)


def test_zero_stages_shard_more_state():
    job = load_job_config(None, ["model.preset=llama-7b", "cluster.num_workers=8", "data.seq_len=4096"])
    cost = CostModel(job, load_profile("h100_sxm"))
    totals = [cost.static_memory(stage).total for stage in range(4)]
    assert totals == sorted(totals, reverse=True) and totals[0] > 2 * totals[3]


def test_log_interpolation_is_clamped_at_the_table_ends():
    table = {8192: 500.0, 32768: 560.0}
    assert interpolate_log(table, 1024) == 500.0 and interpolate_log(table, 10**6) == 560.0
    assert interpolate_log(table, 16384) == pytest.approx(530.0)
