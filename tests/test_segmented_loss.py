"""Segmented LM head + cross-entropy: same loss and gradients as the full logits path, without the tokens x vocab
logits ever existing (checked on every tensor made in forward and backward, and on the bytes saved for backward)."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from orchestrator.loss import segmented_cross_entropy
from orchestrator.model import LlamaModel

TOL = dict(atol=1e-6, rtol=1e-5)
"""fp32: only the order of sums differs (the loss and the LM head weight's gradient are summed chunk by chunk)."""


def _full_loss(model, tokens, targets):
    logits = model.lm_head(model.hidden_states(tokens))
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _loss_and_grads(model, loss_fn, tokens, targets):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, tokens, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_tokens", [64, 100, 4096])
@pytest.mark.parametrize("tie", [True, False])
def test_loss_and_gradients_equal_the_full_logits_path(debug_model_config, chunk_tokens, tie):
    torch.manual_seed(0)
    debug_model_config.tie_embeddings = tie
    model = LlamaModel(debug_model_config)
    tokens = torch.randint(0, 256, (2, 257))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    reference_loss, reference = _loss_and_grads(model, _full_loss, inputs, targets)
    segmented = lambda m, x, t: segmented_cross_entropy(m.hidden_states(x), m.lm_head, t, chunk_tokens)
    loss, grads = _loss_and_grads(model, segmented, inputs, targets)
    torch.testing.assert_close(loss, reference_loss, **TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], **TOL, msg=name)
    default_loss, _ = _loss_and_grads(model, lambda m, x, t: m(x, targets=t), inputs, targets)
    torch.testing.assert_close(default_loss, reference_loss, **TOL)  # the model's default path is segmented


def test_ignored_targets_are_left_out_of_the_mean():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 96, 32), nn.Linear(32, 50, bias=False)
    targets = torch.randint(0, 50, (2, 96))
    targets[0, :40] = -100
    full = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(segmented_cross_entropy(hidden, head, targets, 64), full, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(segmented_cross_entropy(hidden, head, targets, 64), full.detach(), **TOL)


class _LargestTensor(TorchDispatchMode):
    """Elements of the largest tensor any op produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def _saved_bytes_and_largest(loss_fn, hidden, head, targets):
    saved = []
    with _LargestTensor() as mode:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            loss = loss_fn(hidden, head, targets)
        loss.backward()
    return sum(saved), mode.largest


def test_peak_is_one_chunk_of_logits_not_all_of_them():
    """Vocabulary 8192, 2 x 1024 tokens: full logits are 64 MiB in fp32; a 256-token chunk is 8 MiB."""
    torch.manual_seed(0)
    tokens, vocab, dim, chunk = 2048, 8192, 64, 256
    head = nn.Linear(dim, vocab, bias=False)
    hidden = torch.randn(2, tokens // 2, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (2, tokens // 2))
    full = lambda h, m, t: F.cross_entropy(m(h).float().flatten(0, 1), t.flatten())
    full_saved, full_largest = _saved_bytes_and_largest(full, hidden, head, targets)
    seg_saved, seg_largest = _saved_bytes_and_largest(
        lambda h, m, t: segmented_cross_entropy(h, m, t, chunk), hidden, head, targets)
    print(f"\nsaved for backward: full {full_saved / 2**20:.1f} MiB, segmented {seg_saved / 2**20:.2f} MiB; "
          f"largest tensor: full {full_largest * 4 / 2**20:.1f} MiB, segmented {seg_largest * 4 / 2**20:.1f} MiB")
    assert full_largest == tokens * vocab and full_saved >= tokens * vocab * 4
    assert seg_largest <= chunk * vocab
    assert seg_saved <= hidden.nbytes + targets.nbytes + 1024  # the chunk inputs (views of hidden) and labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_cross_entropy_matches_autograd_on_the_upcast_logits(dtype):
    from orchestrator.loss import _CrossEntropySum

    torch.manual_seed(0)
    logits = (torch.randn(96, 300) * 4).to(dtype)
    labels = torch.randint(0, 300, (96,))
    labels[:7] = -100
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = _CrossEntropySum.apply(ours, labels)
    reference = F.cross_entropy(theirs.float(), labels, reduction="sum")
    (loss * 0.37).backward()
    (reference * 0.37).backward()
    torch.testing.assert_close(loss, reference, atol=1e-4, rtol=1e-5)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(ours.grad.float(), theirs.grad.float(), **tol)
    assert ours.grad.dtype == dtype and logits.equal(ours.detach())  # the input is not modified in place


_PEAK_SCRIPT = """
import resource, sys, torch
from orchestrator.loss import _CrossEntropySum
torch.set_num_threads(1)
tokens, vocab = 2048, 32768
logits = torch.empty(tokens, vocab, dtype=torch.bfloat16).normal_().requires_grad_()  # no fp32 temporary
labels = torch.randint(0, vocab, (tokens,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
_CrossEntropySum.apply(logits, labels).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / (tokens * vocab))
"""


def test_chunk_cross_entropy_peak_fits_the_planners_e_plus_8_bytes_per_logit():
    """Peak resident memory of a fresh process (large buffers are mmap'd, so freed memory leaves RSS): beyond the
    bf16 logits (e = 2 bytes), forward and backward add at most 8 bytes per logit, the planner's budget. The plain
    `F.cross_entropy(logits.float())` adds 12 here (14.3 GiB for one 8192 x 128K chunk measured on an H100)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, cwd=root, check=True)
    extra_bytes_per_logit = float(out.stdout.split()[-1])
    print(f"\nchunk cross-entropy: {extra_bytes_per_logit:.2f} bytes per logit beyond the bf16 logits")
    assert extra_bytes_per_logit <= 8.5
