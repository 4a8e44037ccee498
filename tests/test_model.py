"""The Llama-style decoder: preset sizes, causality, grouped-query attention, RoPE."""

import math

import pytest
import torch
import torch.nn.functional as F

from spec.config import MODEL_PRESETS, ModelConfig
from spec.flops import parameter_count
from orchestrator.model import (Attention, EagerKernels, LlamaModel, _RMSNormFunction, apply_rope, count_parameters,
                                rope_tables)
from tests.conftest import StorageTracker

PUBLISHED_PARAMETER_COUNTS = {"llama-7b": 6_738_415_616, "llama3-8b": 8_030_261_248, "llama-1b": 1_235_814_400}


@pytest.mark.parametrize("preset,expected", PUBLISHED_PARAMETER_COUNTS.items())
def test_presets_have_the_published_parameter_counts(preset, expected):
    assert parameter_count(ModelConfig(**MODEL_PRESETS[preset])) == expected


@pytest.mark.parametrize("tie", [True, False])
def test_shape_formula_matches_the_module(debug_model_config, tie):
    debug_model_config.tie_embeddings = tie
    assert count_parameters(LlamaModel(debug_model_config)) == parameter_count(debug_model_config)


def test_logits_shape_and_finite_loss(debug_model_config):
    model = LlamaModel(debug_model_config)
    tokens = torch.randint(0, debug_model_config.vocab_size, (2, 128))
    assert model(tokens).shape == (2, 128, debug_model_config.vocab_size)
    targets = torch.randint(0, debug_model_config.vocab_size, (2, 128))
    loss = model(tokens, targets=targets)  # at init, about uniform over the vocabulary
    assert math.isclose(loss.item(), math.log(debug_model_config.vocab_size), rel_tol=0.05)


def test_future_tokens_do_not_change_past_logits(debug_model_config):
    torch.manual_seed(0)
    model = LlamaModel(debug_model_config)
    tokens = torch.randint(0, 256, (1, 64))
    changed = tokens.clone()
    changed[0, 40:] = (changed[0, 40:] + 1) % 256
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :40], after[:, :40])
    assert not torch.allclose(before[:, 40:], after[:, 40:])


def test_grouped_query_attention_equals_attention_with_repeated_kv_heads(debug_model_config):
    torch.manual_seed(0)
    attention = Attention(debug_model_config)
    x = torch.randn(2, 32, debug_model_config.hidden_size)
    cos, sin = rope_tables(torch.arange(32), debug_model_config.head_dim, 10000.0, x.dtype)
    head, groups = debug_model_config.head_dim, debug_model_config.num_heads // debug_model_config.num_kv_heads
    q = apply_rope(attention.q_proj(x).view(2, 32, -1, head).transpose(1, 2), cos, sin)
    k = apply_rope(attention.k_proj(x).view(2, 32, -1, head).transpose(1, 2), cos, sin)
    v = attention.v_proj(x).view(2, 32, -1, head).transpose(1, 2)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head)
    scores = scores.masked_fill(torch.ones(32, 32, dtype=torch.bool).triu(1), float("-inf"))
    reference = attention.o_proj((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 32, -1))
    torch.testing.assert_close(attention(x, cos, sin), reference, atol=1e-5, rtol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(query_pos, key_pos):
        cos, sin = rope_tables(torch.tensor([query_pos, key_pos]), 16, 10000.0, torch.float32)
        rq = apply_rope(q, cos[:1], sin[:1])
        rk = apply_rope(k, cos[1:], sin[1:])
        return (rq * rk).sum().item()

    assert math.isclose(score(10, 3), score(107, 100), rel_tol=1e-4)
    assert not math.isclose(score(10, 3), score(10, 4), rel_tol=1e-3)


def test_tied_embeddings_share_one_tensor(debug_model_config):
    model = LlamaModel(debug_model_config)
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_gradients_match_plain_autograd(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 17, 64).to(dtype)
    weight = torch.empty(64).uniform_(0.5, 1.5).to(dtype)
    grad = torch.randn(3, 17, 64)

    def plain(inp, w):
        x32 = inp.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(inp) * w

    def run(fn):
        inp, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(inp, w)
        (out.float() * grad).sum().backward()
        return out, inp.grad, w.grad

    ours = run(lambda inp, w: _RMSNormFunction.apply(inp, w, 1e-5, EagerKernels))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    for mine, reference in zip(ours, run(plain)):
        torch.testing.assert_close(mine.float(), reference.float(), **tol)


def _norm_step(rows_per_chunk: int, monkeypatch):
    """One bf16 RMSNorm forward and backward over 2 x 200 tokens: output, input and weight gradients, and the most
    bytes the backward's own tensors held at once (each storage an op makes, weakly held)."""
    import orchestrator.model as model_module

    monkeypatch.setattr(model_module, "NORM_CHUNK_ROWS", rows_per_chunk)
    torch.manual_seed(0)
    norm = model_module.RMSNorm(32, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 200, 32, dtype=torch.bfloat16, requires_grad=True)
    out = norm(x)
    tracker = StorageTracker()
    with tracker:
        out.backward(torch.randn_like(out))
    return out, x.grad, norm.weight.grad, tracker.peak


def test_rms_norm_computes_a_chunk_of_tokens_at_a_time(monkeypatch):
    """Its fp32 work (the upcast input and gradient, the normalised rows, their products: about ten fp32 bytes a
    bf16 element at once) is one chunk's: over the whole sequence the backward of one norm held 25 GiB at 320K
    tokens x 4096 beside the tensors the planner counts. Each row is computed as unchunked (output and input
    gradient bitwise); the weight gradient sums the chunks' in fp32."""
    whole = _norm_step(10**9, monkeypatch)
    chunked = _norm_step(64, monkeypatch)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    torch.testing.assert_close(chunked[2].float(), whole[2].float(), rtol=1e-2, atol=1e-2)
    grad_x, chunk_work = 2 * 200 * 32 * 2, 12 * 64 * 32 * 4  # the bf16 input gradient; a chunk's fp32 work
    assert chunked[3] <= grad_x + chunk_work < whole[3]
