"""Packed documents on a GPU (skipped without CUDA; run on a lent GPU machine): the FlexAttention path (compiled, block
mask from the document boundaries) gives each document's attention and gradients as SDPA on the document alone, and
a packed micro-batch through the model, plain and under a swap / recompute plan, each document's loss and gradients.

    python -m pytest -q -m gpu tests/test_documents_gpu.py
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.attention import DocumentLayout, document_attention
from orchestrator.documents import PackedDocuments, pack
from orchestrator.memory import tokenwise
from orchestrator.model import LlamaModel
from spec.config import ModelConfig
from tests.conftest import layer_plans, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

MODEL = ModelConfig(vocab_size=512, hidden_size=256, num_layers=3, num_heads=8, num_kv_heads=2, intermediate_size=512)
DOCUMENTS = [700, 1500, 300, 1596, 2048, 1000, 1000]
"""Two rows of 4096: whole documents, cut nowhere; tiles full, partial and skipped."""


def _alone(q, k, v, layout):
    rows = []
    for row, lengths in enumerate(layout.lengths):
        starts = np.cumsum([0] + lengths[:-1])
        rows.append(torch.cat([F.scaled_dot_product_attention(q[row:row + 1, :, s:s + n], k[row:row + 1, :, s:s + n],
                                                              v[row:row + 1, :, s:s + n], is_causal=True,
                                                              enable_gqa=True)
                               for s, n in zip(starts, lengths)], dim=2))
    return torch.cat(rows)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_flex_document_attention_equals_each_document_alone(dtype, tolerance):
    layout = DocumentLayout([[700, 1500, 300, 1596], [2048, 1000, 1000, 48]], [0, 0])
    assert layout.kernel_for(torch.device("cuda")) == "flex"
    torch.manual_seed(0)
    q = torch.randn(2, 8, 4096, 64, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 4096, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn_like(q)
    out = document_attention(q, k, v, layout)
    want = _alone(q, k, v, layout)
    scale = want.abs().max().item()
    assert (out - want).abs().max().item() <= tolerance * scale
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert (got - expected).abs().max().item() <= tolerance * expected.abs().max().item()


def packed_micro_batch(vocab_size: int, documents=DOCUMENTS, seq_len: int = 4096):
    """DOCUMENTS of random tokens packed into rows of seq_len on the GPU: (token stream, document offsets, tokens,
    targets, positions, the rows' DocumentLayout)."""
    stream = np.random.default_rng(1).integers(0, vocab_size, sum(documents))
    offsets = np.concatenate([[0], np.cumsum(documents)])
    packed = PackedDocuments(stream, *pack(offsets, seq_len), seq_len, 0.0)
    rows = [packed.window(i) for i in range(packed.num_train)]
    tokens, targets, positions = (torch.from_numpy(np.stack([getattr(r, key) for r in rows])).cuda()
                                  for key in ("tokens", "targets", "positions"))
    return stream, offsets, tokens, targets, positions, packed.layout(rows)


@pytest.mark.parametrize("with_plan", [False, True], ids=["plain", "swap_recompute_plan"])
def test_a_packed_micro_batch_on_flex_equals_each_document_alone(with_plan):
    stream, offsets, tokens, targets, positions, layout = packed_micro_batch(MODEL.vocab_size)
    torch.manual_seed(0)
    model = LlamaModel(MODEL).cuda()
    reference = copy.deepcopy(model)
    if with_plan:
        tokenwise.apply(model, tokenwise.Config(), layer_plans({1: (0.25, 0.5, 0.25), 2: (0.5, 0.0, 0.5, True)}))
    predicted = int((targets != -100).sum())
    loss = model(tokens, targets=targets, positions=positions, documents=layout) * predicted
    loss.backward()
    total = 0
    for start, stop in zip(offsets[:-1], offsets[1:]):
        document = torch.from_numpy(stream[start:stop]).cuda()[None]
        total = total + reference(document[:, :-1], targets=document[:, 1:]) * (stop - start - 1)
    total.backward()
    assert torch.allclose(loss, total, rtol=1e-4)
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        assert (mine.grad - theirs.grad).abs().max() <= 1e-3 * theirs.grad.abs().max(), name


def test_per_document_attention_on_cudnn_equals_each_document_alone():
    """data.document_attention=per_document on CUDA: cuDNN's own forward and backward ops once per document (windows
    extended to 1,024-token multiples), bf16; fp32 is refused in one line (cuDNN's attention takes bf16/fp16)."""
    layout = DocumentLayout([[700, 1500, 300, 1596], [2048, 1000, 1000, 48]], [0, 0], kernel="per_document")
    torch.manual_seed(0)
    q = torch.randn(2, 4096, 8, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, 4096, 2, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
            for _ in range(2))
    grad = torch.randn_like(q)
    out = document_attention(q, k, v, layout)
    want = _alone(q, k, v, layout)
    assert (out - want).abs().max().item() <= 2e-2 * want.abs().max().item()
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert (got - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()
    with pytest.raises(RuntimeError, match="takes bf16 or fp16, not float32"):
        document_attention(q.float(), k.float(), v.float(), layout)
