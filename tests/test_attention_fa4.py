"""train.attention_kernel=fa4 where FlashAttention-4 cannot run (this machine: no CUDA) and the wrapper's plumbing.

FA4's kernels run on Hopper/Blackwell GPUs only (tests/test_attention_fa4_gpu.py runs them). Here a reference of
their documented contract (flash_attn_func on [B, S, H, D]; flash_attn_varlen_func on [total, H, D] with cumulative
lengths; both causal, returning (out, lse)) written with SDPA checks what the wrapper adds: the layouts, the
boundaries over several rows and a padding segment, and that the kernel reads the model's tensors in place (the
token-wise runtime finds saved tensors by their storage)."""

import pytest
import torch
import torch.nn.functional as F

from launch.preflight import check_job
from orchestrator import attention, attention_fa4
from orchestrator.attention import DocumentLayout, causal_attention, document_attention
from orchestrator.model import LlamaModel
from spec.config import ModelConfig, load_job_config
from spec.errors import ConfigError


class _Reference:
    """FA4's two entry points as documented, on SDPA; records what it was given."""

    def __init__(self):
        self.seen = []

    def causal(self, q, k, v, causal):
        assert causal and q.dim() == 4 and q.stride(-1) == 1
        self.seen += [q, k, v]
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                             enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        assert causal and q.dim() == 3 and cu_seqlens_q is cu_seqlens_k and cu_seqlens_q.dtype == torch.int32
        self.seen += [q, k, v]
        bounds = cu_seqlens_q.tolist()
        assert max_seqlen_q == max_seqlen_k == max(b - a for a, b in zip(bounds, bounds[1:]))
        parts = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True,
                                                enable_gqa=True)[0].transpose(0, 1)
                 for a, b in zip(bounds, bounds[1:])]
        return torch.cat(parts), None


@pytest.fixture
def reference(monkeypatch):
    kernels = _Reference()
    monkeypatch.setattr(attention_fa4, "_KERNELS", (kernels.causal, kernels.varlen))
    return kernels


def _model_layout(batch, heads, seq, dim):
    """[B, H, S, D] views of [B, S, H, D] storage, as the model's projections make q, k and v."""
    return torch.randn(batch, seq, heads, dim, dtype=torch.float64).transpose(1, 2).requires_grad_()


def test_the_causal_wrapper_reads_the_model_tensors_in_place_and_equals_sdpa(reference):
    torch.manual_seed(0)
    q, k, v = _model_layout(2, 4, 48, 8), _model_layout(2, 2, 48, 8), _model_layout(2, 2, 48, 8)
    out = causal_attention(q, k, v, "fa4")
    want = causal_attention(q, k, v, "sdpa")
    assert out.shape == want.shape and torch.allclose(out, want)
    assert [t.data_ptr() for t in reference.seen] == [t.data_ptr() for t in (q, k, v)]


def test_the_varlen_wrapper_gives_each_segment_alone_over_rows_and_padding(reference):
    layout = DocumentLayout([[20, 5, 23], [48], [7, 30, 11]], [0, 0, 11], kernel="varlen")
    assert layout.cumulative_lengths("cpu").tolist() == [0, 20, 25, 48, 96, 103, 133, 144]
    torch.manual_seed(1)
    q, k, v = _model_layout(3, 4, 48, 8), _model_layout(3, 2, 48, 8), _model_layout(3, 2, 48, 8)
    grad = torch.randn(3, 4, 48, 8, dtype=torch.float64)
    out = document_attention(q, k, v, layout, "fa4")
    assert [t.data_ptr() for t in reference.seen] == [t.data_ptr() for t in (q, k, v)]
    want = document_attention(q, k, v, DocumentLayout(layout.lengths, layout.padding, kernel="sdpa_mask"))
    assert torch.allclose(out, want)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert torch.allclose(got, expected)


def test_auto_picks_the_varlen_kernel_with_fa4_on_cuda_only():
    layout = DocumentLayout([[4, 4]], [0])
    assert layout.kernel_for(torch.device("cuda"), "fa4") == "varlen"
    assert layout.kernel_for(torch.device("cuda"), "sdpa") == "flex"
    assert layout.kernel_for(torch.device("cpu"), "fa4") == "sdpa_mask"
    assert DocumentLayout([[8]], [0], kernel="per_document").kernel_for(torch.device("cuda"), "fa4") == "per_document"


def test_fa4_where_it_cannot_run_is_one_line_before_any_step():
    reason = attention_fa4.unavailable(torch.device("cpu"), torch.bfloat16)
    assert "CUDA" in reason
    model = LlamaModel(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64))
    with pytest.raises(ConfigError, match=r"^train.attention_kernel=fa4: FlashAttention-4 runs on CUDA GPUs, not cpu; "
                                          r"or train.attention_kernel=sdpa"):
        attention.install(model, "fa4", False, torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match=r"^data.document_attention=varlen: "):
        attention.install(model, "sdpa", True, torch.device("cpu"), torch.float32)
    attention.install(model, "sdpa", False, torch.device("cpu"), torch.float32)
    assert {layer.attn.kernel for layer in model.layers} == {"sdpa"}


@pytest.mark.parametrize("overrides,message", [
    (["train.attention_kernel=fa4"], "train.attention_kernel=fa4 runs FlashAttention-4, which needs CUDA workers"),
    (["train.attention_kernel=fa4", "cluster.use_gpu=true", "train.precision=fp32"], "which takes bf16 or fp16"),
])
def test_the_driver_refuses_fa4_where_the_workers_cannot_run_it(overrides, message, monkeypatch):
    monkeypatch.setattr("launch.preflight._check_local_devices", lambda job: None)
    job = load_job_config(None, ["data.source=synthetic", "metrics.hardware_profile=h200", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_job(job)


def test_an_unknown_kernel_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"train.attention_kernel \('fa3'\) must be one of sdpa, fa4"):
        load_job_config(None, ["train.attention_kernel=fa3"])


def test_eval_refuses_fa4_where_it_cannot_run_before_loading_weights():
    from orchestrator.eval.models import EvalModel

    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model = EvalModel("m", config, 128, None, "/nonexistent:tag", 128)  # the weights' path is never read
    with pytest.raises(ConfigError, match=r"^train.attention_kernel=fa4: FlashAttention-4 runs on CUDA GPUs"):
        model.build(torch.device("cpu"), torch.float32, "fa4")


def test_the_planner_prices_fa4_at_the_profiles_measured_ratio():
    """Attention seconds scale by the profile's attention_kernel_speedup (1.14 on the H200 profiles); a profile
    without an entry prices fa4 at SDPA's rates; the kernel is a plan input only when it is not sdpa."""
    from dataclasses import replace

    from planner.cost_model import CostModel
    from spec.hardware import load_profile
    from spec.plan import plan_inputs

    shape = ["model.preset=llama-7b", "model.num_layers=4", "data.seq_len=131072", "data.micro_batch_size=1",
             "cluster.num_workers=1"]
    jobs = {kernel: load_job_config(None, [*shape, f"train.attention_kernel={kernel}"]) for kernel in ("sdpa", "fa4")}
    h200 = load_profile("h200")
    assert h200.measured.attention_kernel_speedup["fa4"] == pytest.approx(1.14)
    rates = {kernel: CostModel(job, h200).attention_tflops(131072) for kernel, job in jobs.items()}
    assert rates["fa4"] == pytest.approx(1.14 * rates["sdpa"])
    bare = replace(h200, measured=replace(h200.measured, attention_kernel_speedup={}))
    assert CostModel(jobs["fa4"], bare).attention_tflops(131072) == pytest.approx(rates["sdpa"])
    inputs = {kernel: plan_inputs(job, h200, "bf16") for kernel, job in jobs.items()}
    assert "attention_kernel" not in inputs["sdpa"] and inputs["fa4"]["attention_kernel"] == "fa4"
    assert {k: v for k, v in inputs["fa4"].items() if k != "attention_kernel"} == inputs["sdpa"]


def test_the_planner_counts_fa4s_grouped_query_backward_buffers():
    """cuDNN's GQA backward writes dk and dv per query head (two q-sized bf16 buffers); FA4's accumulates them per
    key/value head in fp32 (two kv-sized fp32 buffers): Llama-3-8B's 32 / 8 heads, 16 KB against 8 KB a token."""
    from planner.planning import make_plan
    from spec.hardware import load_profile

    shape = ["model.preset=llama3-8b", "model.num_layers=2", "data.seq_len=8192", "data.micro_batch_size=1",
             "cluster.num_workers=1"]
    sizes = {}
    for kernel in ("sdpa", "fa4"):
        outcome = make_plan(load_job_config(None, [*shape, f"train.attention_kernel={kernel}"]), load_profile("h200"))
        sizes[kernel] = next(b.size_bytes for b in outcome.layer_block.buffers if b.name == "grad_kv_expanded")
    assert sizes["sdpa"] == 2 * 4096 * 2 * 8192
    assert sizes["fa4"] == 2 * 8 * 128 * 4 * 8192


def test_varlen_on_cpu_workers_is_refused_before_the_documents_are_prepared(tmp_path, monkeypatch):
    monkeypatch.setattr("launch.preflight._check_local_devices", lambda job: None)
    job = load_job_config(None, ["data.source=jsonl", f"data.path={tmp_path / 'x.jsonl'}", "data.tokenizer=t.json",
                                 "data.document_attention=varlen", "metrics.hardware_profile=h200"])
    with pytest.raises(ConfigError, match=r"^data.document_attention=varlen runs FlashAttention-4, which needs CUDA"):
        check_job(job)
    assert not any(tmp_path.iterdir())
