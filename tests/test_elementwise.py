"""train.elementwise=compiled: the layer's RMSNorm and RoPE through `orchestrator.elementwise`'s functions with
their own backward. On CPU the same functions run uncompiled (the compile itself is GPU-tested in
tests/test_elementwise_gpu.py): losses and gradients are bitwise the eager model's, and the layer saves the same
tensors, so plans and the token-wise runtime are unchanged."""

import copy

import pytest
import torch

from orchestrator import elementwise
from orchestrator.model import LlamaModel
from spec.config import ModelConfig, load_job_config
from spec.errors import ConfigError

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
UNCOMPILED = elementwise.FusedKernels(lambda fn: fn)


def _pair():
    torch.manual_seed(0)
    eager = LlamaModel(MODEL)
    fused = copy.deepcopy(eager)
    assert elementwise.install(fused, "compiled", torch.device("cpu"), kernels=UNCOMPILED).startswith("compiled")
    return eager, fused


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def test_the_fused_functions_give_the_eager_model_bit_for_bit():
    eager, fused = _pair()
    for length in (33, 20):  # the functions take any length (the compiled ones are dynamic)
        tokens = torch.randint(0, MODEL.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
        want, got = _loss_and_grads(eager, tokens), _loss_and_grads(fused, tokens)
        assert torch.equal(want[0], got[0])
        assert all(torch.equal(a, b) for a, b in zip(want[1], got[1]))


def test_the_rope_backward_is_the_rotations_transpose():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(9, 4, dtype=torch.float64)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    assert torch.autograd.gradcheck(lambda t: UNCOMPILED.rotate(t, cos, sin), (x,))


def test_the_layer_saves_the_same_tensors():
    """Same shapes, dtypes and storages saved for backward, so a plan's bytes and the token-wise runtime's roles
    hold for both."""
    eager, fused = _pair()
    tokens = torch.randint(0, MODEL.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))

    def saved(model):
        found = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append(t) or t, lambda t: t):
            model(tokens)
        return sorted((tuple(t.shape), str(t.dtype)) for t in found)

    assert saved(eager) == saved(fused)


def test_eager_and_cpu_keep_the_layer_as_it_is():
    model = LlamaModel(MODEL)
    assert elementwise.install(model, "eager", torch.device("cuda")) == "eager"
    assert "CUDA only" in elementwise.install(model, "compiled", torch.device("cpu"))
    assert all(layer.attn.rope is elementwise.apply_rope for layer in model.layers)


def test_an_unknown_mode_is_one_line():
    with pytest.raises(ConfigError, match=r"train.elementwise \('fused'\) must be one of eager, compiled"):
        load_job_config(None, ["train.elementwise=fused"])
