"""`longtrain profile hardware`: measure this machine (one CUDA GPU, or the CPU) into a hardware profile YAML.

What is measured, each one after a warm-up, median of several timed runs (CUDA events on a GPU, perf_counter on
CPU): bf16 and fp32 matmul; causal attention forward + backward (`scaled_dot_product_attention`, is_causal,
causal FLOPs halved as `attention_fwd_bwd_tflops_by_seq_len` always was) and each attention kernel at the same
lengths (SDPA's pick, its cuDNN and flash backends, FlashAttention-4 where it runs: `attention_tflops_by_kernel`);
token elimination's block scoring at the same lengths (`token_scoring_tflops_by_seq_len`); one `DecoderLayer` of the
configured shape forward + backward and the bytes per token it saves for backward (saved_tensors_hooks, storages
counted once); pinned and pageable host<->device copies each way and both ways at once (two streams); device and host
memory; NCCL all-reduce and all-to-all bus bandwidth when at least two GPUs are visible (one process per GPU).
A measurement that fails is recorded under `measured.skipped` with its reason; the others still run.
"""

import os
import platform
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from spec.units import GIB


@dataclass
class Settings:
    """Sizes and repeats for one kind of device; `--quick` trims them."""

    matmul_size: int
    attention_seq_lens: List[int]
    attention_heads: int
    attention_head_dim: int
    layer_seq_lens: List[int]
    copy_bytes: int
    nccl_bytes: int
    repeats: int
    warmup: int = 1


def settings_for(cuda: bool, quick: bool) -> Settings:
    if cuda:
        return Settings(matmul_size=8192, attention_seq_lens=[8192, 32768] if quick else [8192, 32768, 65536, 131072],
                        attention_heads=32, attention_head_dim=128,
                        layer_seq_lens=[8192] if quick else [16384, 65536],
                        copy_bytes=(256 if quick else 1024) * 2**20, nccl_bytes=(64 if quick else 512) * 2**20,
                        repeats=3 if quick else 5)
    return Settings(matmul_size=256 if quick else 512, attention_seq_lens=[256, 512] if quick else [256, 512, 1024],
                    attention_heads=4, attention_head_dim=32, layer_seq_lens=[256] if quick else [256, 1024],
                    copy_bytes=0, nccl_bytes=0, repeats=3 if quick else 5)


@dataclass
class Measurement:
    """The rates measured so far, the skipped ones with their reason, and the summary lines printed."""

    measured: Dict = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    lines: List[str] = field(default_factory=list)

    def report(self, what: str, value: str) -> None:
        line = f"  {what:<44} {value}"
        self.lines.append(line)
        print(line, flush=True)

    def attempt(self, name: str, function: Callable[[], None]) -> None:
        """Run one measurement; a failure is recorded as skipped and the next measurement still runs."""
        started = time.perf_counter()
        try:
            function()
        except Exception as error:  # noqa: BLE001 - any failure of one measurement must not stop the others
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
            self.skipped[name] = reason
            self.report(name, f"skipped ({reason})")
        finally:
            _free_device_memory()
        print(f"    ({name}: {time.perf_counter() - started:.1f} s)", flush=True)


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except RuntimeError as error:  # a sticky CUDA error: the next measurements will say so themselves
        print(f"    (could not free device memory: {str(error).splitlines()[0][:120]})", flush=True)


def median_seconds(function: Callable[[], None], cuda: bool, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `function` after warm-up; CUDA events on the current stream when on a GPU."""
    import torch

    for _ in range(warmup):
        function()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_matmul(result: Measurement, device, dtype_name: str, size: int, repeats: int) -> None:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    cuda = device.type == "cuda"
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32, not TF32
    try:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        seconds = median_seconds(lambda: torch.matmul(a, b, out=out), cuda, repeats, warmup=2)
    finally:
        torch.set_float32_matmul_precision(precision)
    tflops = 2.0 * size**3 / seconds / 1e12
    result.measured[f"matmul_{dtype_name}_tflops"] = round(tflops, 4 if tflops < 1 else 1)
    result.report(f"matmul {dtype_name} {size}x{size}x{size}", f"{_rate(tflops)}  ({seconds * 1e3:.2f} ms)")


def measure_attention(result: Measurement, device, dtype, seq_len: int, heads: int, head_dim: int,
                      repeats: int) -> None:
    """Causal SDPA forward + backward; FLOPs causal-halved: 3 x (2 x seq^2 x heads x head_dim)."""
    import torch
    import torch.nn.functional as F

    shape = (1, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)

    def step():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    seconds = median_seconds(step, device.type == "cuda", repeats)
    tflops = 3 * 2.0 * seq_len**2 * heads * head_dim / seconds / 1e12
    result.measured.setdefault("attention_fwd_bwd_tflops_by_seq_len", {})[seq_len] = _round_rate(tflops)
    result.report(f"attention fwd+bwd causal {heads}x{head_dim} seq {seq_len}",
                  f"{_rate(tflops)}  ({seconds * 1e3:.1f} ms)")


def measure_attention_kernels(result: Measurement, device, dtype, seq_lens: List[int], heads: int, head_dim: int,
                              repeats: int) -> None:
    """Causal forward + backward of each kernel at each length on the same q, k, v laid out as the model's
    projections make them ([B, S, H, D] storage): train.attention_kernel's choices (sdpa: PyTorch's own pick, fa4)
    and SDPA's backends forced one at a time (sdpa_cudnn, sdpa_flash; CUDA only), into `attention_tflops_by_kernel`
    (what `train.attention_kernel=auto` and the cost model read). A kernel that cannot run here is recorded under
    `skipped` with the reason; one that fails at a length leaves that length out of its row."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from orchestrator import attention_fa4
    from orchestrator.attention import causal_attention

    def run(kernel: str, backend=None):
        def call(q, k, v):
            if backend is None:
                return causal_attention(q, k, v, kernel)
            with sdpa_kernel([backend]):
                return causal_attention(q, k, v, "sdpa")
        return call

    kernels = {"sdpa": run("sdpa")}
    if device.type == "cuda":
        kernels.update(sdpa_cudnn=run("sdpa", SDPBackend.CUDNN_ATTENTION),
                       sdpa_flash=run("sdpa", SDPBackend.FLASH_ATTENTION))
    reason = attention_fa4.unavailable(device, dtype)
    if reason is None:
        kernels["fa4"] = run("fa4")
    else:
        result.skipped["attention_fa4"] = reason
    table = result.measured.setdefault("attention_tflops_by_kernel", {})
    for seq_len in seq_lens:
        q, k, v, grad = (torch.randn(1, seq_len, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
                         for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        rates = {}
        for name, call in kernels.items():
            try:
                seconds = median_seconds(lambda call=call: torch.autograd.grad(call(q, k, v), (q, k, v), grad),
                                         device.type == "cuda", repeats)
            except RuntimeError as error:  # a backend without this shape: the others still count
                result.report(f"attention {name} seq {seq_len}", f"skipped ({str(error).splitlines()[0][:100]})")
                continue
            rates[name] = 3 * 2.0 * seq_len**2 * heads * head_dim / seconds / 1e12
            table.setdefault(name, {})[seq_len] = _round_rate(rates[name])
        result.report(f"attention fwd+bwd causal {heads}x{head_dim} seq {seq_len}, by kernel",
                      ", ".join(f"{name} {_rate(rate)}" for name, rate in rates.items()))
        del q, k, v, grad


def measure_token_scoring(result: Measurement, device, dtype, seq_lens: List[int], heads: int, head_dim: int,
                          repeats: int) -> None:
    """Token elimination's exact block scoring (`token_elim.block_informativeness`: the Triton kernel on a GPU, the
    chunked torch path on a CPU) at each length, in q.k FLOPs of the causal pairs per second, into
    `token_scoring_tflops_by_seq_len`: the kernel runs well under flash attention's rate (0.4x on an H200), so
    the cost model prices a token-eliminated layer's scoring at this row, not attention's."""
    import torch

    from orchestrator.memory.token_elim import block_informativeness
    from spec.config import TokenElimConfig

    block = TokenElimConfig().block_size
    table = result.measured.setdefault("token_scoring_tflops_by_seq_len", {})
    for seq_len in seq_lens:
        q, k = (torch.randn(1, seq_len, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
                for _ in range(2))
        seconds = median_seconds(lambda: block_informativeness(q, k, block), device.type == "cuda", repeats)
        tflops = seq_len**2 * heads * head_dim / seconds / 1e12  # spec.flops.block_scoring_flops_per_token x seq
        table[seq_len] = _round_rate(tflops)
        result.report(f"token elimination scoring {heads}x{head_dim} seq {seq_len} (blocks of {block})",
                      f"{_rate(tflops)}  ({seconds * 1e3:.1f} ms)")
        del q, k


def measure_layer(result: Measurement, device, dtype, model, seq_len: int, repeats: int, saved_bytes: bool) -> None:
    """One DecoderLayer forward + backward (model FLOPs, causal-halved) and, once, its saved bytes per token."""
    import torch

    from orchestrator.model import DecoderLayer, rope_tables
    from spec.flops import attention_forward_flops_per_token, layer_matmul_params

    torch.manual_seed(0)
    layer = DecoderLayer(model).to(device=device, dtype=dtype)
    x = torch.randn(1, seq_len, model.hidden_size, device=device, dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(torch.arange(seq_len, device=device), model.head_dim, model.rope_theta, dtype)
    grad = torch.randn_like(x)
    if saved_bytes:
        per_token = saved_bytes_per_token(layer, x, cos, sin)
        result.measured["layer_saved_bytes_per_token"] = round(per_token, 1)
        result.report(f"layer saved for backward (seq {seq_len})", f"{per_token:,.0f} bytes/token")

    def step():
        layer(x, cos, sin).backward(grad)
        x.grad = None
        for parameter in layer.parameters():
            parameter.grad = None

    seconds = median_seconds(step, device.type == "cuda", repeats)
    flops = 3 * (2.0 * layer_matmul_params(model) + attention_forward_flops_per_token(model, seq_len)) * seq_len
    tflops = flops / seconds / 1e12
    result.measured.setdefault("layer_fwd_bwd_tflops_by_seq_len", {})[seq_len] = _round_rate(tflops)
    result.report(f"layer fwd+bwd hidden {model.hidden_size} seq {seq_len}",
                  f"{_rate(tflops)}  ({seconds * 1e3:.1f} ms)")


def saved_bytes_per_token(layer, x, cos, sin) -> float:
    """Bytes autograd keeps for backward after one forward, per token; each storage once, parameters and the
    shared RoPE tables left out."""
    import torch

    excluded = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    excluded |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    storages: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x, cos, sin)
    del out
    return sum(storages.values()) / x.shape[1]


def measure_copies(result: Measurement, device, num_bytes: int, repeats: int, pinned: bool) -> None:
    """Host<->device copies: each way, then both at once on two side streams (GB/s = 1e9 bytes/s)."""
    import torch

    kind = "pinned" if pinned else "pageable"
    host_in = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=pinned)
    host_out = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=pinned)
    host_in.fill_(1)
    device_in = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    device_out = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    device_out.fill_(2)
    up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def h2d():
        with torch.cuda.stream(up):
            device_in.copy_(host_in, non_blocking=pinned)
        torch.cuda.synchronize(device)

    def d2h():
        with torch.cuda.stream(down):
            host_out.copy_(device_out, non_blocking=pinned)
        torch.cuda.synchronize(device)

    def both():
        with torch.cuda.stream(up):
            device_in.copy_(host_in, non_blocking=True)
        with torch.cuda.stream(down):
            host_out.copy_(device_out, non_blocking=True)
        torch.cuda.synchronize(device)

    for direction, function, moved in (("h2d", h2d, num_bytes), ("d2h", d2h, num_bytes),
                                       ("both_ways", both, 2 * num_bytes)):
        seconds = median_seconds(function, False, repeats)  # synchronised, so wall time is the copy time
        gbps = moved / seconds / 1e9
        result.measured[f"pcie_{kind}_gbps_{direction}"] = round(gbps, 1)
        result.report(f"host<->device {kind} {direction.replace('_', ' ')} ({num_bytes / 2**20:.0f} MiB)",
                      f"{gbps:8.1f} GB/s")


def measure_memory(result: Measurement, cuda: bool) -> Dict[str, float]:
    import psutil
    import torch

    host_gib = psutil.virtual_memory().total / GIB
    result.report("host memory", f"{host_gib:8.1f} GiB")
    if cuda:
        device_gib = torch.cuda.get_device_properties(0).total_memory / GIB
        free_bytes, _ = torch.cuda.mem_get_info(0)
        result.report("device memory (free now)", f"{device_gib:8.1f} GiB ({free_bytes / GIB:.1f} GiB free)")
        return {"device_memory_gib": round(device_gib, 1), "host_memory_gib": round(host_gib, 1)}
    # On a CPU 'device' and host are the same RAM: two thirds as device, one third as host for plans.
    return {"device_memory_gib": round(host_gib * 2 / 3, 1), "host_memory_gib": round(host_gib / 3, 1)}


def measure_nccl(result: Measurement, num_gpus: int, num_bytes: int, repeats: int,
                 timeout_seconds: float = 120.0) -> None:
    """All-reduce and all-to-all bus bandwidth over every visible GPU, one spawned process per GPU (NCCL on
    127.0.0.1); bus bandwidth as nccl-tests reports it: all-reduce x 2(n-1)/n, all-to-all x (n-1)/n."""
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = Path(tmp) / "nccl.json"
        context = mp.start_processes(_nccl_worker, args=(num_gpus, _free_port(), num_bytes, repeats, str(out_path)),
                                     nprocs=num_gpus, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_seconds
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                raise TimeoutError(f"NCCL measurement took over {timeout_seconds:.0f} s; its processes were stopped")
        rates = json.loads(out_path.read_text())
    for key, label in (("allreduce_busbw_gbps", "all-reduce"), ("alltoall_busbw_gbps", "all-to-all")):
        result.measured[key] = round(rates[key], 1)
        result.report(f"NCCL {label} bus bandwidth, {num_gpus} GPUs ({num_bytes / 2**20:.0f} MiB)",
                      f"{rates[key]:8.1f} GB/s")


def _nccl_worker(rank: int, world_size: int, port: int, num_bytes: int, repeats: int, out_path: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        elements = num_bytes // 2 // world_size * world_size
        data = torch.ones(elements, dtype=torch.bfloat16, device="cuda")
        received = torch.empty_like(data)
        seconds = {}
        for name, function in (("allreduce", lambda: dist.all_reduce(data)),
                               ("alltoall", lambda: dist.all_to_all_single(received, data))):
            dist.barrier()
            seconds[name] = median_seconds(function, True, repeats, warmup=2)
        size = elements * 2
        factor = (world_size - 1) / world_size
        rates = {"allreduce_busbw_gbps": size / seconds["allreduce"] * 2 * factor / 1e9,
                 "alltoall_busbw_gbps": size / seconds["alltoall"] * factor / 1e9}
        if rank == 0:
            Path(out_path).write_text(json.dumps(rates))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    """A free TCP port on loopback for the NCCL process group (the tests have their own in tests/conftest.py)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _round_rate(tflops: float) -> float:
    return round(tflops, 4) if tflops < 1 else round(tflops, 1)


def _rate(tflops: float) -> str:
    return f"{tflops:8.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:8.1f} GFLOP/s"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_name() -> str:
    return socket.gethostname() or os.environ.get("HOSTNAME", "unknown host")


def optional_min(*values: Optional[float]) -> Optional[float]:
    present = [v for v in values if v]
    return min(present) if present else None


def measure_cpu_adam(result: Measurement, num_params: int, repeats: int) -> None:
    """DeepSpeed's CPU Adam (what steps an offloaded optimizer) on this host: parameters updated per second. Only
    when the op is already built: its first use compiles it (8.5 minutes on a 2-core machine), which a profile of
    about a minute must not do; train once with train.offload.optimizer=true and profile again."""
    import torch
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from torch.utils.cpp_extension import _get_build_directory

    built = Path(_get_build_directory(CPUAdamBuilder.NAME, False)) / f"{CPUAdamBuilder.NAME}.so"
    if not built.is_file():
        raise RuntimeError(f"DeepSpeed's CPU Adam is not built here ({built} missing; its first use builds it)")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    param = torch.nn.Parameter(torch.zeros(num_params))
    param.grad = torch.full_like(param, 1e-3)
    optimizer = DeepSpeedCPUAdam([param], lr=1e-4)
    seconds = median_seconds(optimizer.step, False, repeats)
    rate = num_params / seconds
    result.measured["cpu_adam_params_per_second"] = round(rate, -6)
    result.report(f"DeepSpeed CPU Adam ({num_params / 1e6:.0f}M fp32 parameters)", f"{rate / 1e9:8.2f} B params/s")
