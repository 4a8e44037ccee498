"""The compression codecs' fused path (`orchestrator.memory.codec_kernels`, train.elementwise=compiled on CUDA): the
rounding noise's properties, the fused drivers (whole tensors at once) against the op-by-op ones (blocks of rows),
and torch.compile of the encoders and decoders against the same functions run eagerly. On CPU the fused drivers run
uncompiled (`install(identity, "cpu")`) except in the one compile test; the GPU compile is in
tests/test_codec_kernels_gpu.py. Durations on this 2-core machine: under 1 s each, the compile test ~9 s."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spec.config import load_job_config
from orchestrator.memory import codec_kernels, compact, quant_int4_deriv, quant_int8
from orchestrator.memory import apply_plan
from orchestrator.model import LlamaModel
from tests.conftest import loss_and_grads

CPU = torch.device("cpu")


@pytest.fixture
def fused_drivers():
    """The fused drivers on CPU tensors, the functions uncompiled (the arithmetic is the same either way)."""
    codec_kernels.install(lambda fn: fn, "cpu")
    yield
    codec_kernels.install(None)


def test_the_noise_is_uniform_and_a_function_of_seed_and_index():
    keys = quant_int8.noise_keys(7)
    index = torch.arange(1 << 18)
    u = quant_int8.rounding_noise(index, *keys)
    assert u.dtype == torch.float32 and 0 <= float(u.min()) and float(u.max()) < 1
    expected = index.numel() / 16
    chi_square = float(((torch.histc(u, bins=16, min=0, max=1) - expected) ** 2 / expected).sum())
    assert chi_square < 45  # 15 degrees of freedom: p < 1e-4 above 45
    centred = u - 0.5
    assert abs(float((centred[:-1] * centred[1:]).mean())) / float(centred.var()) < 0.01  # neighbours uncorrelated
    assert torch.equal(quant_int8.rounding_noise(index[1000:3000], *keys), u[1000:3000])  # same wherever encoded
    for other in (quant_int8.rounding_noise(index, *quant_int8.noise_keys(8)),  # another seed
                  quant_int8.rounding_noise(index, *quant_int8.noise_keys(7 + 2**32)),  # its high bits count
                  quant_int8.rounding_noise(index + 2**32, *keys)):  # indices past 2^32 (1M tokens x 14336)
        assert float((other == u).float().mean()) < 0.001


def test_codes_depend_on_the_seed_only_and_any_row_range_encodes_alone():
    x = torch.randn(40, 24)
    running = quant_int8.RunningRange(0.5)
    first = quant_int8.quantize(x, running, 4, update=True, noise_seed=11)
    again = quant_int8.quantize(x, running, 4, update=False, noise_seed=11)
    other = quant_int8.quantize(x, running, 4, update=False, noise_seed=12)
    assert torch.equal(first.codes, again.codes) and not torch.equal(first.codes, other.codes)
    x3 = quant_int8.grouped(x, 4)
    assert torch.equal(quant_int8.encode_seeded(x3[13:29], first.scale, first.offset, 255, 11, first_row=13),
                       first.codes[13:29])


def test_the_fused_drivers_encode_and_decode_as_the_blocks_do(fused_drivers, monkeypatch):
    """Whole tensors at once (fused) against a block of 5 rows at a time (op by op): the same codes and values."""
    torch.manual_seed(0)
    x = torch.randn(37, 32).to(torch.bfloat16)
    scale, offset = torch.full((4,), 255 / 6.0), torch.full((4,), -3.0)
    x3 = quant_int8.grouped(x, 4)

    def encoded():
        return (quant_int8.encode_seeded(x3, scale, offset, 255, 5, 3),
                quant_int4_deriv.encode_packed(x3, scale, offset, 5, 3))

    fused = encoded()
    codec_kernels.install(None)
    monkeypatch.setattr(quant_int8, "ENCODE_BLOCK_ELEMENTS", 5 * 32)
    eager = encoded()
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])
    levels16 = quant_int8.encode_seeded(x3, scale, offset, quant_int4_deriv.LEVELS, 5, 3)
    assert torch.equal(eager[1], quant_int4_deriv.pack_nibbles(levels16))
    codec_kernels.install(lambda fn: fn, "cpu")
    packed = compact.Packed(4, False, tuple(x.shape), x.dtype)
    assert torch.equal(packed.restore_rows((eager[1], scale, offset), 4, 20),
                       compact.int8_rows(levels16[4:20], scale, offset, None, 16, 32, torch.float32))


@pytest.mark.parametrize("section", [
    ["compression.linear_inputs=int8", "compression.norm_inputs=int8", "compression.silu=int8"],
    ["compression.linear_inputs=int8", "compression.silu=int4"],
    ["compression.silu=int4", "compression.wta_crs_keep_ratio=0.7"],
])
def test_a_compressed_model_trains_the_same_with_the_fused_drivers(fused_drivers, monkeypatch, section):
    """Loss bitwise and gradients to fp32 rounding: the fused SwiGLU backward (all rows at once) and weight gradients
    (the fused chunk size) against the op-by-op chunks, with chunks small enough that op by op takes several."""
    monkeypatch.setattr(compact, "BACKWARD_CHUNK_ELEMENTS", 8 * 352)
    monkeypatch.setattr(compact, "FUSED_BACKWARD_CHUNK_ELEMENTS", 8 * 352)
    monkeypatch.setattr(quant_int8, "ENCODE_BLOCK_ELEMENTS", 8 * 64)
    job = load_job_config(None, section + ["compression.layers=[0,1]", "data.seq_len=64"])
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    apply_plan(model, None, job.compression, job.token_elim, job.train)
    eager = copy.deepcopy(model)
    tokens = torch.randint(0, job.model.vocab_size, (2, 64))
    fused_loss, fused_grads = loss_and_grads(model, tokens, tokens)
    codec_kernels.install(None)
    eager_loss, eager_grads = loss_and_grads(eager, tokens, tokens)
    assert torch.equal(fused_loss, eager_loss)
    for name, want in eager_grads.items():
        assert torch.allclose(fused_grads[name], want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), name


def test_the_compiled_codecs_equal_the_eager_functions():
    """torch.compile (inductor on CPU) of the S2A encoder (the noise hash, rounding and packing in one kernel): bitwise
    the eager function's codes, the seed and first index passed as values (a new seed compiles nothing new). In a
    process of its own: the compilation leaves fake tensors that later tests' `gc.get_objects` scans trip on."""
    command = [sys.executable, "-c", "from tests.test_codec_kernels import compiled_equals_eager; "
                                     "compiled_equals_eager()"]
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def compiled_equals_eager() -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(1)
    x3 = quant_int8.grouped(torch.randn(30, 16).to(torch.bfloat16), 2)
    scale, offset = torch.tensor([40.0, 50.0]), torch.tensor([-3.0, -2.5])
    codec_kernels.install(codec_kernels.compile_codec, "cpu")
    for seed, first_row in ((3, 2), (2**40 + 9, 5)):
        keys, first = quant_int8.noise_keys(seed), first_row * 16
        packed = codec_kernels.kernel(quant_int4_deriv.seeded_nibbles, CPU)(x3, scale, offset, *keys, first)
        assert torch.equal(packed, quant_int4_deriv.seeded_nibbles(x3, scale, offset, *keys, first))
    assert counters["stats"]["unique_graphs"] == 1


def test_a_compiled_compressed_model_compiles_only_in_its_first_step():
    """Every codec function is traced in the first step (the running range's first update goes through the decayed
    update with weight 0): a graph traced later would be compiled inside a timed or a training step. Dynamo's own
    tracing and guards decide this, so its eager backend shows it without inductor's compile time."""
    from torch._dynamo.utils import counters

    job = load_job_config(None, ["compression.linear_inputs=int8", "compression.norm_inputs=int8",
                                 "compression.silu=int4", "compression.layers=[0,1]", "data.seq_len=128"])
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    apply_plan(model, None, job.compression, job.token_elim, job.train)
    tokens = torch.randint(0, job.model.vocab_size, (1, 129))
    torch._dynamo.reset()
    codec_kernels.install(lambda fn: codec_kernels.compile_codec(fn, backend="eager"), "cpu")
    try:
        graphs = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        codec_kernels.install(None)
        torch._dynamo.reset()
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[0], graphs


def test_a_compiled_codec_has_dynamic_rows_and_static_widths():
    """`compile_codec` traces one graph for chunks of any number of rows, in which the groups and widths are
    constants (a kernel then finds an element's group by dividing by a constant, not by a runtime size; with every
    size symbolic, as `dynamic=True` alone makes them, this fails). Dynamo's graph, no inductor: under a second."""
    graphs = []

    def recording(graph_module, example_inputs):
        graphs.append([node.meta["example_value"].shape for node in graph_module.graph.nodes
                       if node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.Tensor)])
        return graph_module.forward

    torch._dynamo.reset()
    decode = codec_kernels.compile_codec(quant_int8.dequantized, backend=recording)
    codes = torch.randint(0, 256, (64, 4, 24), dtype=torch.uint8)
    scale, offset = torch.full((4,), 255 / 8.0), torch.full((4,), -4.0)
    try:
        for rows in (40, 56, 64):
            got = decode(codes[:rows], scale, offset, torch.bfloat16)
            assert torch.equal(got, quant_int8.dequantized(codes[:rows], scale, offset, torch.bfloat16))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1, graphs
    rows, groups, width = graphs[0][0]
    assert isinstance(rows, torch.SymInt) and (groups, width) == (4, 24) and type(groups) is int, graphs[0]


def test_the_int8_swap_codec_is_the_same_on_the_fused_path():
    """SwapCodes encode and decode through `codec_kernels` (whole slices at once when fused): the same codes and
    values as op by op (the identity stands in for the compiler: the branch is what is tested here)."""
    torch.manual_seed(0)
    flat = (torch.randn(3000, 64) * torch.linspace(0.1, 5, 64)).view(-1)
    op_by_op = quant_int8.SwapCodes.encode(flat, 64, seed=7)
    want = torch.empty_like(flat)
    op_by_op.decode_into(want, op_by_op.codes)
    codec_kernels.install(lambda fn: fn, "cpu")
    try:
        fused = quant_int8.SwapCodes.encode(flat, 64, seed=7)
        got = torch.empty_like(flat)
        fused.decode_into(got, fused.codes)
    finally:
        codec_kernels.install(None)
    assert torch.equal(fused.codes, op_by_op.codes) and torch.equal(got, want)
    other = quant_int8.SwapCodes.encode(flat, 64, seed=8)
    assert not torch.equal(other.codes, op_by_op.codes)  # another slice's seed: other noise
