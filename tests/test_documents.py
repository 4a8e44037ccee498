"""Packed documents (data.packing=documents): a packed sequence of k documents gives each document's loss and
gradients as if it ran alone (fp32), also under a token-wise swap / recompute plan and with Ulysses sp=2 on gloo
(model level and through the trainer's step on real DeepSpeed engines); the packing table keeps documents whole;
the block mask FlexAttention gets skips exactly what the document mask allows; MFU, the planner and the config
rules see documents."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.process_group import init_process_group
from orchestrator.attention import DocumentLayout
from orchestrator.documents import IGNORE_INDEX, PackedDocuments, pack
from orchestrator.memory import tokenwise
from orchestrator.metrics import StepMeter
from orchestrator.model import LlamaModel
from spec.config import ModelConfig, load_job_config
from spec.errors import ConfigError
from spec.flops import attention_training_flops, matmul_training_flops_per_token
from tests.conftest import layer_plans, spawn_gloo

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64)
SEQ = 128
DOCUMENTS = [37, 60, 20, 11, 100, 9]
"""Row 0: 37 + 60 + 20 + 11 = 128 exactly; row 1: 100 + 9 and 19 tokens of padding (first fit)."""
PLAN = {1: (0.25, 0.5, 0.25), 2: (0.5, 0.0, 0.5, True)}
"""Layers split into kept / swapped / recomputed tokens (the last also swaps its skeletal tensors)."""


def _packed():
    stream = np.random.default_rng(5).integers(0, MODEL.vocab_size, sum(DOCUMENTS))
    offsets = np.concatenate([[0], np.cumsum(DOCUMENTS)])
    packed = PackedDocuments(stream, *pack(offsets, SEQ), SEQ, 0.0)
    rows = [packed.window(i) for i in range(packed.num_train)]
    batch = [torch.from_numpy(np.stack([getattr(r, k) for r in rows])) for k in ("tokens", "targets", "positions")]
    return stream, offsets, batch, packed.layout(rows)


def _model():
    torch.manual_seed(3)
    return LlamaModel(MODEL)


def _token_losses(model, tokens, targets, positions=None, documents=None):
    logits = model(tokens, positions=positions, documents=documents)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def _alone(model, stream, offsets):
    """Each document run alone: its summed token losses, and the gradients of their total."""
    model.zero_grad(set_to_none=True)
    sums = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        document = torch.from_numpy(stream[start:stop])[None]
        sums.append(_token_losses(model, document[:, :-1], document[:, 1:]).sum())
    torch.stack(sums).sum().backward()
    return torch.stack(sums).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed_sums(model, batch, layout):
    """The packed run: each document's summed token losses (in document order), and the gradients of their total."""
    tokens, targets, positions = batch
    model.zero_grad(set_to_none=True)
    losses = _token_losses(model, tokens, targets, positions, layout)
    losses.sum().backward()
    ids = layout.segment_ids("cpu")
    sums = [losses[row][ids[row] == segment].sum() for row, lengths in enumerate(layout.lengths)
            for segment in range(len(lengths) - (1 if layout.padding[row] else 0))]
    return torch.stack(sums).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close(got, want):
    loss, grads = got
    want_loss, want_grads = want
    assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-5), (loss, want_loss)
    for name, grad in want_grads.items():
        scale = grad.abs().max().item()
        assert (grads[name] - grad).abs().max().item() <= 2e-5 * max(scale, 1e-3), name


def test_windows_restart_positions_and_never_predict_across_documents():
    stream, offsets, (tokens, targets, positions), layout = _packed()
    assert layout.lengths == [[37, 60, 20, 11], [100, 9, 19]] and layout.padding == [0, 19]
    assert positions[0, 37].item() == 0 and positions[0, 36].item() == 36 and positions[1, 100].item() == 0
    for row, lengths in enumerate(layout.lengths):
        ends = np.cumsum(lengths) - 1
        assert (targets[row, ends] == IGNORE_INDEX).all()  # a document's last token predicts nothing
    assert (targets[1, 109:] == IGNORE_INDEX).all() and (tokens[0, :37] == torch.from_numpy(stream[:37])).all()
    assert (targets[0, :36] == torch.from_numpy(stream[1:37])).all()


def test_packing_keeps_documents_whole_and_cuts_only_longer_ones():
    lengths = np.random.default_rng(0).lognormal(4.0, 1.2, 3000).astype(np.int64) + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pieces, firsts = pack(offsets, 256)
    covered = np.zeros(offsets[-1], dtype=np.int64)
    for start, length, _ in pieces:
        covered[start:start + length] += 1
    assert (covered == 1).all()  # every token exactly once
    per_sequence = np.add.reduceat(pieces[:, 1], firsts[:-1])
    assert per_sequence.max() <= 256 and 1 - per_sequence.sum() / (256 * len(per_sequence)) < 0.03  # little padding
    cut = pieces[:, 2].astype(bool)
    assert (pieces[cut, 1] == 256).all()  # only sequence-length pieces continue
    assert cut.sum() == sum(-(-n // 256) - 1 for n in lengths)
    oldest_not_placed = np.minimum.accumulate(pieces[::-1, 0])[::-1]  # first tokens grow in document order
    assert (pieces[firsts[:-1], 0] == oldest_not_placed[firsts[:-1]]).all()  # each sequence opens with the oldest


KERNELS = pytest.mark.parametrize("kernel", ["sdpa_mask", "per_document"])
"""The CPU kernels of packed documents: the dense mask, and the causal kernel once per document."""


@KERNELS
def test_a_packed_sequence_equals_each_document_alone(kernel):
    stream, offsets, batch, layout = _packed()
    layout.kernel = kernel
    model = _model()
    _assert_close(_packed_sums(model, batch, layout), _alone(model, stream, offsets))


@KERNELS
def test_a_packed_sequence_under_a_swap_and_recompute_plan_equals_each_document_alone(kernel):
    stream, offsets, batch, layout = _packed()
    layout.kernel = kernel
    model = _model()
    reference = _alone(model, stream, offsets)
    planned = copy.deepcopy(model)
    tokenwise.apply(planned, tokenwise.Config(), layer_plans(PLAN))
    for _ in range(2):  # the second step reuses the host buffers
        _assert_close(_packed_sums(planned, batch, layout), reference)


@KERNELS
def test_a_packed_sequence_with_layers_replayed_whole_equals_each_document_alone(kernel):
    """Whole-layer checkpointing (a replayed forward matches saved tensors by order: the per-document kernel saves
    one log-sum-exp per document, the same ones again in the replay)."""
    from spec.plan import LayerPlan

    stream, offsets, batch, layout = _packed()
    layout.kernel = kernel
    model = _model()
    reference = _alone(model, stream, offsets)
    planned = copy.deepcopy(model)
    tokenwise.apply(planned, tokenwise.Config(), [LayerPlan(0, checkpoint_layer=True),
                                                  LayerPlan(1, 0.0, 0.0, 1.0, True, checkpoint_layer=True),
                                                  LayerPlan(2, 0.5, 0.0, 0.5)])
    for _ in range(2):
        _assert_close(_packed_sums(planned, batch, layout), reference)


def test_activation_compression_composes_with_packed_documents():
    """Mesa int8 keeps the forward exact: the packed losses stay each document's; the backward runs."""
    from orchestrator.memory import compressed
    from spec.config import CompressionConfig

    stream, offsets, batch, layout = _packed()
    model = _model()
    reference, _ = _alone(model, stream, offsets)
    section = CompressionConfig(linear_inputs="int8", norm_inputs="int8", silu="int4")
    compressed.apply(model, compressed.Config(section), range(MODEL.num_layers))
    sums, grads = _packed_sums(model, batch, layout)
    assert torch.allclose(sums, reference, rtol=1e-5, atol=1e-5)
    assert all(torch.isfinite(g).all() for g in grads.values())


def _sp_rank(rank, world, put):
    """Ulysses over two gloo ranks, on both attention paths (DeepSpeed's DistributedAttention; the shard-saving one
    under a swap / recompute plan): each rank feeds its shard of the packed batch (its positions, the whole layout)
    and weights its shard mean as the trainer does; gradients averaged as ZeRO does."""
    import torch.distributed as dist

    from orchestrator.sequence_parallel import install, sequence_groups, shard_of
    from orchestrator.trainer import _shard_weight
    from spec.parallel import ParallelDims

    init_process_group(use_cuda=False)
    torch.set_num_threads(1)
    group = sequence_groups(ParallelDims(world_size=world, sp_degree=world, seq_len=SEQ))
    _, _, (tokens, targets, positions), layout = _packed()
    shard = shard_of(tokens, group)
    results = {}
    for with_plan in (False, True):
        model = _model()
        if with_plan:
            tokenwise.apply(model, tokenwise.Config(), layer_plans(PLAN))
        install(model, group, split_layers=set(PLAN) if with_plan else set())
        loss = model(tokens[:, shard], targets=targets[:, shard], positions=positions[:, shard], documents=layout)
        loss = loss * _shard_weight(targets, shard, group)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = {}
        for name, param in model.named_parameters():
            dist.all_reduce(param.grad)
            grads[name] = param.grad / world
        results[with_plan] = (total.item() / world, grads)
    if rank == 0:
        put(results)


def test_ulysses_sp2_on_a_packed_sequence_equals_each_document_alone():
    stream, offsets, (_, targets, _), _ = _packed()
    predicted = int((targets != IGNORE_INDEX).sum())
    sums, grads = _alone(_model(), stream, offsets)
    reference = (sums.sum() / predicted, {k: g / predicted for k, g in grads.items()})
    (results,) = spawn_gloo(_sp_rank, 2)
    for with_plan, (loss, sp_grads) in results.items():
        _assert_close((torch.tensor(loss), sp_grads), reference)


def test_flex_block_mask_runs_exactly_the_document_mask():
    """FlexAttention (forward; it has no CPU backward) with the block mask built from the boundaries equals SDPA
    under the dense mask, with full, partial and skipped 128-token tiles and a sequence not a multiple of 128."""
    from torch.nn.attention.flex_attention import flex_attention

    layout = DocumentLayout([[300, 5, 130, 77], [512], [1, 200, 250, 61]], [77, 0, 0])
    mask = layout.block_mask("cpu")
    assert mask.full_kv_num_blocks.sum() > 0 and mask.kv_num_blocks.sum() < 3 * 4 * 5 / 2
    torch.manual_seed(0)
    for layout in (layout, DocumentLayout([[100, 92]], [0])):
        batch, seq = len(layout.lengths), layout.seq_len
        q, k, v = torch.randn(batch, 4, seq, 16), torch.randn(batch, 2, seq, 16), torch.randn(batch, 2, seq, 16)
        with torch.no_grad():
            flex = flex_attention(q, k, v, block_mask=layout.block_mask("cpu"), enable_gqa=True)
            dense = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask("cpu"), enable_gqa=True)
        assert (flex - dense).abs().max().item() < 1e-5


def test_mfu_counts_the_attention_the_documents_need():
    layout = DocumentLayout([[100, 28], [64, 64]], [28, 0])
    meter = StepMeter(MODEL, 128, 1.0, 0, "node0")
    meter.start()
    meter.count_documents(layout, sp_degree=2)
    flops, full = meter._flops(tokens=128)
    squares = (100**2 + 64**2 * 2) / 2
    assert flops == matmul_training_flops_per_token(MODEL) * 128 + attention_training_flops(MODEL, squares)
    assert full - flops == attention_training_flops(MODEL, squares, causal_halved=False) / 2
    assert meter.stop(1, 1.0, 0.0, tokens=128).attention == "documents"  # the console's MFU line says so
    meter.start()  # a step without documents: seq_len^2 per sequence, as before
    assert meter._flops(tokens=128)[0] == meter.flops_per_token * 128


def test_token_elimination_with_packed_documents_is_refused_at_load():
    with pytest.raises(ConfigError, match="token_elim.enabled=true does not run with data.packing=documents"):
        load_job_config(None, ["data.source=jsonl", "data.path=x.jsonl", "data.tokenizer=t.json",
                               "token_elim.enabled=true"])
    with pytest.raises(ConfigError, match="data.packing=documents needs a source of documents"):
        load_job_config(None, ["data.packing=documents"])
    job = load_job_config(None, ["data.source=jsonl", "data.path=x.jsonl", "data.tokenizer=t.json"])
    assert job.data.packs_documents and not load_job_config().data.packs_documents


@pytest.mark.parametrize("kernel,overrides,words", [
    ("flex", ["cluster.use_gpu=false"], "flex needs CUDA workers"),
    ("per_document", ["cluster.use_gpu=true", "train.precision=fp32"], "takes bf16 or fp16, not train.precision=fp32"),
])
def test_a_kernel_the_workers_cannot_run_is_refused_before_preparing(kernel, overrides, words, tmp_path):
    from launch.preflight import _prepare_documents

    job = load_job_config(None, ["data.source=jsonl", f"data.path={tmp_path / 'x.jsonl'}", "data.tokenizer=t.json",
                                 f"data.document_attention={kernel}", *overrides])
    with pytest.raises(ConfigError, match=words):
        _prepare_documents(job)
    assert not any(tmp_path.iterdir())  # refused before anything was prepared


def test_the_planner_counts_the_attention_of_the_documents(tmp_path):
    import json

    from planner.cost_model import CostModel
    from spec.hardware import load_profile
    from spec.plan import plan_inputs
    from spec.prepared import packing_summary_file

    overrides = ["model.preset=llama-7b", "model.num_layers=2", "data.seq_len=131072", "data.micro_batch_size=1",
                 "cluster.num_workers=1"]
    stream_job = load_job_config(None, overrides)
    documents_job = load_job_config(None, overrides + ["data.source=jsonl", "data.path=x", "data.tokenizer=t",
                                                       "model.vocab_size=32000", f"data.prepared={tmp_path}"])
    (tmp_path / packing_summary_file(131072)).write_text(json.dumps({"attention_share": 0.125,
                                                                     "effective_length": 16384}))
    profile = load_profile("h100_sxm")
    stream, documents = CostModel(stream_job, profile).layer(), CostModel(documents_job, profile).layer()
    assert documents.forward_seconds < 0.6 * stream.forward_seconds
    assert documents.recompute_seconds == stream.recompute_seconds
    assert "documents" not in plan_inputs(stream_job, profile, "bf16")
    assert plan_inputs(documents_job, profile, "bf16")["documents"] == {"attention_share": 0.125,
                                                                        "effective_length": 16384}
