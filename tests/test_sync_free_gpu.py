"""No host synchronisation inside a training step's forward and backward (issue 19's static-shape friendliness):
kernels queue ahead only if nothing in the step waits for the GPU. Skipped without CUDA; run on a lent GPU machine:

    python -m pytest -q -m gpu tests/test_sync_free_gpu.py

torch.cuda.set_sync_debug_mode("error") turns every synchronising call (.item(), a device-to-host copy, nonzero,
a stream or event wait) into an error naming it. The first step runs outside the check (allocator, cuDNN and
compilation set-up); the second is checked: the plain layer, a swap / recompute plan (the copy streams), the
fused elementwise kernels, FlashAttention-4 (where its package is installed), and the compiled compression codecs
(Mesa int8 and S2A int4 codes, and with WTA-CRS's row draws).
"""

import pytest
import torch

from orchestrator import attention, attention_fa4, elementwise
from orchestrator.memory import codec_kernels, compressed, tokenwise
from orchestrator.model import LlamaModel
from spec.config import CompressionConfig, ModelConfig
from tests.conftest import layer_plans, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

MODEL = ModelConfig(vocab_size=512, hidden_size=256, num_layers=3, num_heads=8, num_kv_heads=2, intermediate_size=512)


CODES = dict(linear_inputs="int8", norm_inputs="int8", silu="int4")


@pytest.fixture(autouse=True)
def codecs_op_by_op_afterwards():
    yield
    codec_kernels.install(None)


@pytest.mark.parametrize("setup", ["plain", "swap_recompute_plan", "fused_elementwise", "fa4", "compressed",
                                   "compressed_wta_crs"])
def test_a_step_does_not_synchronise_with_the_host(setup):
    torch.manual_seed(0)
    model = LlamaModel(MODEL).cuda().to(torch.bfloat16)
    if setup == "fa4":
        reason = attention_fa4.unavailable(torch.device("cuda"), torch.bfloat16)
        if reason is not None:
            pytest.skip(reason)
        attention.install(model, "fa4", False, torch.device("cuda"), torch.bfloat16)
    if setup == "swap_recompute_plan":
        tokenwise.apply(model, tokenwise.Config(), layer_plans([(0.25, 0.5, 0.25), (0.0, 1.0, 0.0, True),
                                                                (0.5, 0.0, 0.5)]))
    elif setup.startswith("compressed"):
        section = CompressionConfig(**CODES, **({"wta_crs_keep_ratio": 0.7} if setup.endswith("wta_crs") else {}))
        compressed.apply(model, compressed.Config(section), [0, 1])
    if setup == "fused_elementwise" or setup.startswith("compressed"):
        elementwise.install(model, "compiled", torch.device("cuda"))
    tokens = torch.randint(0, MODEL.vocab_size, (1, 4097), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        model(tokens[:, :-1], targets=tokens[:, 1:]).backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
