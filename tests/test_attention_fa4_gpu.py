"""FlashAttention-4 (train.attention_kernel=fa4) on a Hopper or Blackwell GPU with the flash-attn-4 package (skipped
otherwise, with the reason): its causal and variable-length kernels against an fp32 reference no further off than
SDPA's bf16 kernel is, and a packed micro-batch through the model under a swap / recompute plan equal to the plain
run on the same kernel.

    python -m pytest -q -m gpu tests/test_attention_fa4_gpu.py
"""

import copy

import pytest
import torch

from orchestrator import attention, attention_fa4
from orchestrator.attention import DocumentLayout, causal_attention, document_attention
from orchestrator.memory import tokenwise
from orchestrator.model import LlamaModel
from spec.config import ModelConfig
from tests.conftest import layer_plans, requires_gpu
from tests.test_documents_gpu import packed_micro_batch

_REASON = attention_fa4.unavailable(torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else "no GPU"
pytestmark = [pytest.mark.gpu, requires_gpu, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

MODEL = ModelConfig(vocab_size=512, hidden_size=512, num_layers=3, num_heads=4, num_kv_heads=2,
                    intermediate_size=1024)


def _inputs(batch, seq, heads=8, kv_heads=2, dim=128):
    torch.manual_seed(0)
    make = lambda h: torch.randn(batch, seq, h, dim, device="cuda").transpose(1, 2)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads), make(heads)


def _error(attend, q, k, v, grad):
    """Max error of the output and of each gradient, relative to the largest reference value, for bf16 inputs."""
    reference = [t.detach().requires_grad_() for t in (q, k, v)]
    want = attend["reference"](*reference)
    wants = [want, *torch.autograd.grad(want, reference, grad)]
    half = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = attend["bf16"](*half)
    gots = [out, *torch.autograd.grad(out, half, grad.bfloat16())]
    return [((g.float() - w).abs().max() / w.abs().max()).item() for g, w in zip(gots, wants)]


def test_fa4_causal_is_as_close_to_fp32_as_sdpa_bf16():
    q, k, v, grad = _inputs(1, 8192)
    reference = lambda *t: causal_attention(*t, "sdpa")  # noqa: E731
    fa4 = _error({"reference": reference, "bf16": lambda *t: causal_attention(*t, "fa4")}, q, k, v, grad)
    sdpa = _error({"reference": reference, "bf16": reference}, q, k, v, grad)
    assert all(mine <= 2 * theirs + 1e-3 for mine, theirs in zip(fa4, sdpa)), (fa4, sdpa)


def test_fa4_varlen_gives_each_document_alone_as_closely_as_sdpa_bf16():
    layout = DocumentLayout([[700, 1500, 300, 1596], [2048, 1000, 1000, 48]], [0, 48], kernel="varlen")
    q, k, v, grad = _inputs(2, 4096)
    masked = DocumentLayout(layout.lengths, layout.padding, kernel="sdpa_mask")
    reference = lambda *t: document_attention(*t, masked)  # noqa: E731
    fa4 = _error({"reference": reference, "bf16": lambda *t: document_attention(*t, layout)}, q, k, v, grad)
    sdpa = _error({"reference": reference, "bf16": reference}, q, k, v, grad)
    assert all(mine <= 2 * theirs + 1e-3 for mine, theirs in zip(fa4, sdpa)), (fa4, sdpa)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "documents"])
def test_a_swap_recompute_plan_on_fa4_equals_the_plain_run(packed):
    _, _, tokens, targets, positions, layout = packed_micro_batch(MODEL.vocab_size)
    torch.manual_seed(0)
    plain = LlamaModel(MODEL).cuda().to(torch.bfloat16)
    attention.install(plain, "fa4", False, torch.device("cuda"), torch.bfloat16)
    planned = copy.deepcopy(plain)
    tokenwise.apply(planned, tokenwise.Config(), layer_plans({1: (0.25, 0.5, 0.25), 2: (0.5, 0.0, 0.5, True)}))
    extra = {"positions": positions, "documents": layout} if packed else {}
    losses = []
    for model in (plain, planned):
        loss = model(tokens, targets=targets, **extra)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    for (name, mine), theirs in zip(planned.named_parameters(), plain.parameters()):
        assert (mine.grad.float() - theirs.grad.float()).abs().max() <= 2e-2 * theirs.grad.float().abs().max(), name
