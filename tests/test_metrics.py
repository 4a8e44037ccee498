"""Analytic FLOPs against torch's FlopCounterMode, and the MFU arithmetic."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.metrics import StepMeter
from spec.flops import training_flops_per_token
from orchestrator.model import LlamaModel


@pytest.mark.parametrize("seq_len", [64, 512])
def test_analytic_flops_match_flop_counter_full_attention_convention(debug_model_config, seq_len):
    """FlopCounterMode counts the math attention path over the full square, so compare the full convention."""
    model = LlamaModel(debug_model_config)
    tokens = torch.randint(0, 256, (2, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, targets=tokens).backward()
    analytic = training_flops_per_token(debug_model_config, seq_len, causal_halved=False) * tokens.numel()
    assert counter.get_total_flops() == pytest.approx(analytic, rel=0.03)


def test_causal_convention_halves_only_the_attention_term(debug_model_config):
    full = training_flops_per_token(debug_model_config, 1024, causal_halved=False)
    half = training_flops_per_token(debug_model_config, 1024, causal_halved=True)
    attention_full = 3 * 4 * 1024 * debug_model_config.hidden_size * debug_model_config.num_layers
    assert full - half == pytest.approx(attention_full / 2)


def test_mfu_is_throughput_over_peak(debug_model_config):
    meter = StepMeter(debug_model_config, 256, peak_tflops=1.0, rank=0, node="n")
    meter.start()
    reading = meter.stop(step=1, loss=1.0, lr=0.1, tokens=4096)
    expected_tflops = meter.flops_per_token * 4096 / reading.step_seconds / 1e12
    assert reading.tflops == pytest.approx(expected_tflops)
    assert reading.mfu == pytest.approx(expected_tflops / 1.0)
    assert reading.mfu_full_attention > reading.mfu
