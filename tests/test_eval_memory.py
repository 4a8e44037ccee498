"""Memory at length for `longtrain eval` (issue 22): eval's forward (position chunks, attention once over the whole
sequence) gives the model's plain forward's hidden states, and its peak memory is what `predict_forward_peak`
counts, byte for byte, on the CPU allocator (torch's profiler with profile_memory); the same count says a Llama-2-7B
forward of 1M tokens needs 53 GiB on a GPU in bf16 (the plain forward: 123 GiB)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from orchestrator.eval import forward
from orchestrator.eval.memory import cpu_peak_bytes, predict_forward_peak
from orchestrator.model import LlamaModel, count_parameters
from spec.config import load_job_config
from spec.units import GIB


pytestmark = pytest.mark.usefixtures("one_thread")


def model_of(dtype=torch.float32, **shape) -> LlamaModel:
    torch.manual_seed(0)
    config = dataclasses.replace(load_job_config(None, []).model, **{"num_layers": 2, **shape})
    return LlamaModel(config).to(dtype).eval()


@pytest.mark.parametrize("scaling", ["none", "yarn"])
def test_the_chunked_forward_equals_the_plain_forward(scaling):
    extra = {} if scaling == "none" else {"rope_scaling": dataclasses.replace(
        load_job_config(None, []).model.rope_scaling, type="yarn", factor=4.0, original_max_position_embeddings=64)}
    model = model_of(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=160, **extra)
    tokens = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model.hidden_states(tokens)
    for chunk in (300, 64, 7):  # one chunk, several, and a short last one
        chunked = forward.hidden_states(model, tokens, chunk)
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)


CASES = [  # dtype, shape, length, chunk: each phase of the count is the peak in one of them
    (torch.float32, dict(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=688), 2048, 256),
    (torch.bfloat16, dict(hidden_size=256, num_heads=4, num_kv_heads=4, intermediate_size=688), 2048, 256),
    (torch.float32, dict(hidden_size=128, num_heads=2, num_kv_heads=2, intermediate_size=1024), 1024, 1024),
    (torch.bfloat16, dict(hidden_size=256, num_heads=4, num_kv_heads=1, intermediate_size=128), 1024, 512),
]


@pytest.mark.parametrize("dtype, shape, length, chunk", CASES)
def test_predicted_peak_is_the_measured_peak(dtype, shape, length, chunk):
    model = model_of(dtype, vocab_size=1000, **shape)
    config, element = model.config, torch.empty((), dtype=dtype).element_size()
    tokens = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(0))
    q = torch.zeros(1, config.num_heads, length, config.head_dim, dtype=dtype)
    kv = torch.zeros(1, config.num_kv_heads, length, config.head_dim, dtype=dtype)
    grouped = config.num_heads != config.num_kv_heads
    # SDPA's CPU kernel's own scratch (not a tensor the count can know): its peak less its output and log-sum-exp
    scratch = cpu_peak_bytes(lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=grouped)
                             ) - q.numel() * element - config.num_heads * length * 4

    def plain():
        with torch.inference_mode():
            model.hidden_states(tokens)

    parameters = count_parameters(model)
    chunked_peak = predict_forward_peak(config, length, element, chunk, parameters, scratch)
    plain_peak = predict_forward_peak(config, length, element, None, parameters, scratch)
    assert cpu_peak_bytes(lambda: forward.hidden_states(model, tokens, chunk)) == chunked_peak.activations
    assert cpu_peak_bytes(plain) == plain_peak.activations
    if chunk < length:  # one chunk of all positions is the plain forward plus whole-sequence q, k, v
        assert chunked_peak.activations < plain_peak.activations


def test_a_llama_7b_forward_of_1m_tokens_fits_an_h200_only_chunked():
    config = load_job_config(None, ["model.preset=llama-7b"]).model
    with torch.device("meta"):
        parameters = count_parameters(LlamaModel(config))
    chunked = predict_forward_peak(config, 1 << 20, 2, forward.POSITION_CHUNK, parameters)
    plain = predict_forward_peak(config, 1 << 20, 2, None, parameters)
    assert parameters == 6_738_415_616 and chunked.weights / GIB == pytest.approx(12.55, abs=0.01)
    assert (chunked.phase, round(chunked.total / GIB, 1)) == ("attention", 53.2)  # q, k, v, output: 32 GiB
    assert (plain.phase, round(plain.total / GIB, 1)) == ("MLP", 123.1)  # four 21.5 GiB SwiGLU tensors


def test_a_forward_that_cannot_fit_is_refused_in_one_line(tmp_path):
    from orchestrator.eval.models import EvalModel
    from orchestrator.eval.run import check_memory
    from spec.errors import ConfigError

    job = load_job_config(None, ["model.preset=llama-7b", "eval.lengths=[1048576]"])
    model = EvalModel("llama-7b", job.model, 1 << 20, None, str(tmp_path), 1 << 20)
    check_memory([model], job, torch.device("cuda"), torch.bfloat16, capacity=139 * GIB)  # fits: 53.2 GiB
    with pytest.raises(ConfigError) as refused:
        check_memory([model], job, torch.device("cuda"), torch.bfloat16, capacity=40 * GIB)
    message = str(refused.value)
    assert "\n" not in message and "1048576 tokens needs about 53.2 GiB" in message and "holds 40.0 GiB" in message
