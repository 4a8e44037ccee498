"""train.elementwise=compiled on a GPU (skipped without CUDA; run on a lent GPU machine): RMSNorm, RoPE and SwiGLU compiled
by torch.compile give the eager model's loss and gradients (fp32: 1e-5 relative; bf16: the rounding of bf16), over
two sequence lengths (dynamic shapes, no error on the second).

    python -m pytest -q -m gpu tests/test_elementwise_gpu.py
"""

import copy

import pytest
import torch

from orchestrator import elementwise
from orchestrator.model import LlamaModel
from spec.config import ModelConfig
from tests.conftest import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

MODEL = ModelConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=512)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_compiled_elementwise_equals_eager(dtype, tolerance):
    torch.manual_seed(0)
    eager = LlamaModel(MODEL).cuda().to(dtype)
    fused = copy.deepcopy(eager)
    assert "torch.compile" in elementwise.install(fused, "compiled", torch.device("cuda"))
    for length in (1024, 700):
        tokens = torch.randint(0, MODEL.vocab_size, (2, length + 1), device="cuda")
        results = []
        for model in (eager, fused):
            model.zero_grad(set_to_none=True)
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
            loss.backward()
            results.append((loss.float(), [p.grad.float() for p in model.parameters()]))
        (want_loss, want_grads), (loss, grads) = results
        assert abs(loss.item() - want_loss.item()) <= tolerance * abs(want_loss.item())
        for got, want in zip(grads, want_grads):
            assert (got - want).abs().max().item() <= tolerance * max(want.abs().max().item(), 1e-6)
