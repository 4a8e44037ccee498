"""Analytic FLOPs against torch's FlopCounterMode, and the MFU arithmetic."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.metrics import StepMeter
from spec.config import ModelConfig
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


def test_mfu_is_hand_computed_throughput_over_the_peak():
    """Independent anchors: FLOPs written out by hand for a small shape, a peak other than 1.

    hidden 64, 2 layers, 4 heads of 16, 2 KV heads (k/v width 32), MLP 128, vocab 256:
    matmul weights per layer q 4096 + k 2048 + v 2048 + o 4096 + MLP 3 * 8192 = 36864; two layers and the head
    (16384): 90112, i.e. 180224 forward FLOPs per token; attention at seq 256: 4 * 256 * 64 = 65536 per layer over
    the full square, 32768 causal-halved; training = 3 x forward."""
    shape = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=128, tie_embeddings=True)
    meter = StepMeter(shape, 256, peak_tflops=2.5, rank=0, node="n")
    assert meter.flops_per_token == 3 * (180224 + 2 * 32768)
    assert meter.flops_per_token_full == 3 * (180224 + 2 * 65536)
    meter.start()
    reading = meter.stop(step=1, loss=1.0, lr=0.1, tokens=4096)
    assert reading.tflops == pytest.approx(737280 * 4096 / reading.step_seconds / 1e12)
    assert reading.mfu == pytest.approx(737280 * 4096 / reading.step_seconds / 1e12 / 2.5)
    assert reading.mfu_full_attention == pytest.approx(933888 * 4096 / reading.step_seconds / 1e12 / 2.5)
    assert reading.tokens_per_second == pytest.approx(4096 / reading.step_seconds)
