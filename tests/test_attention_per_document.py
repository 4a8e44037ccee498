"""The per-document attention kernel (data.document_attention=per_document) on CPU, through PyTorch's CPU flash
kernel: outputs and gradients equal SDPA under the dense document mask (fp32), with windows extended past each
document (the extension never leaks into a document's rows or gradients), and the layer saves what SDPA saves (q,
k, v, one output, small log-sum-exps), never a second attention output. The cuDNN path: tests/test_documents_gpu.py."""

import pytest
import torch

from orchestrator.attention import DocumentLayout, document_attention
from orchestrator.attention_per_document import per_document_attention, windows

LAYOUTS = {
    "one row": [[5, 17, 3, 39]],
    "two rows, padding segment": [[30, 34], [1, 40, 23]],
    "one document": [[64]],
}


def _inputs(rows: int, seed: int = 0):
    torch.manual_seed(seed)
    # [B, S, H, D] storage seen as [B, H, S, D], as the model's projections make them
    q = torch.randn(rows, 64, 8, 16).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(rows, 64, 2, 16).transpose(1, 2).requires_grad_() for _ in range(2))
    return q, k, v, torch.randn(rows, 64, 8, 16).transpose(1, 2)


@pytest.mark.parametrize("bucket", [0, 8, 1024], ids=["exact windows", "windows of 8", "windows past the row"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_equals_the_dense_document_mask(name, bucket):
    lengths = LAYOUTS[name]
    q, k, v, grad = _inputs(len(lengths))
    got = per_document_attention(q, k, v, lengths, bucket)
    want = document_attention(q, k, v, DocumentLayout(lengths, [0] * len(lengths), kernel="sdpa_mask"))
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    for mine, reference in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert (mine - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


def test_windows_extend_to_the_bucket_within_the_row():
    assert list(windows([5, 17, 3, 39], 64, 8)) == [(0, 5, 8), (5, 22, 29), (22, 25, 30), (25, 64, 64)]
    assert list(windows([5, 59], 64, 0)) == [(0, 5, 5), (5, 64, 64)]
    shapes = {stop - start for row in ([100, 900, 24], [1000, 24]) for start, _, stop in windows(row, 1024, 256)}
    assert shapes == {256, 1024, 924, 24}  # bucket multiples, or what is left of the row (1024 - 100, 1024 - 1000)


def test_the_layer_saves_what_sdpa_saves_and_no_second_output():
    """q, k, v and the output are saved once each (the output the layer goes on with, no per-call copies); besides
    them only the log-sum-exps, fp32, one value per query row of each window."""
    lengths = [[30, 34], [1, 40, 23]]
    q, k, v, _ = _inputs(2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = per_document_attention(q, k, v, lengths, 8)
    storages = {t.untyped_storage().data_ptr() for t in (q, k, v, out)}
    big = [t for t in saved if t.numel() >= k.numel()]
    assert sorted(t.untyped_storage().data_ptr() for t in big) == sorted(storages) and len(big) == 4
    rows = sum(stop - start for row in lengths for start, _, stop in windows(row, 64, 8))
    small = [t for t in saved if t.numel() < k.numel()]
    assert all(t.dtype == torch.float32 for t in small) and sum(t.numel() for t in small) == rows * q.shape[1]


def test_lengths_that_do_not_cover_the_sequence_are_refused():
    q, k, v, _ = _inputs(1)
    with pytest.raises(ValueError, match="sum to 63, not the sequence's 64"):
        per_document_attention(q, k, v, [[30, 33]])
