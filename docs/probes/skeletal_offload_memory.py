"""Where the memory of a plan that sends skeletal tensors to host goes, on the CPU (no GPU needed).

Why: on an H100 at 128K, plans with the skeletal tensors in host memory peaked 5-12% above the planner's
prediction while the same plan with them on the GPU was predicted exactly (profiles/runs/*bench-4l*.json). The
token-wise runtime runs the same code on the CPU (copies are plain copies, nothing is prefetched), so the bytes it
holds can be followed op by op: a TorchDispatchMode records every storage an op creates on the device (weakly, so a
freed storage drops out) and the live bytes after each op, for one step of a stack of decoder layers after a
warm-up step (weights, the input, its gradient and the host pool's buffers exist before and are left out). It
prints, per plan, the peak of what the step allocates, the planner's level-2 peak for the same layers
(`planner.schedule`, no weight gradients), and the largest storages alive at the peak with the op that made them
and the layer running then. On a GPU (`--device cuda`, bf16) the same runs the CUDA path (side-stream copies,
prefetch one layer ahead) and prints the caching allocator's peak beside the tracker's; `--snapshot DIR` also
writes a CUDA memory snapshot of each tracked step (torch.cuda.memory._dump_snapshot; view it at
https://pytorch.org/memory_viz).

    OMP_NUM_THREADS=1 python3 docs/probes/skeletal_offload_memory.py --seq-len 4096 --hidden 256 --inter 688
    python3 docs/probes/skeletal_offload_memory.py --device cuda --seq-len 131072 --hidden 4096 --inter 11008 \
        --policies 0.4/0/0.6 --snapshot $OUT/snapshots
"""

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from orchestrator.memory import tokenwise
from orchestrator.model import DecoderLayer, rope_tables
from planner.cost_model import CostModel
from planner.layout import lower_bound, solve_layout
from planner.schedule import layer_block_buffers, step_buffers
from spec.config import load_job_config
from spec.hardware import load_profile
from spec.plan import LayerPlan

MIB = 2**20


class LiveBytes(TorchDispatchMode):
    """Every storage made by an op while active, weakly held; the live bytes after each op and the peak."""

    def __init__(self, device: str):
        super().__init__()
        self.device = device
        self.storages = {}
        self.known = set()
        """Storages made before the step (weights, the input and its gradient, RoPE tables, host pool buffers)."""
        self.current_layer = -1
        self.peak, self.at_peak, self.ops = 0, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == self.device:
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if not key or key in self.known:
                    continue
                if key not in self.storages or self.storages[key][0].expired():
                    self.storages[key] = (StorageWeakRef(storage), storage.nbytes(), str(func), self.current_layer)
        self.ops += 1
        live = self.live()
        if sum(n for _, n, _, _ in live) > self.peak:
            self.peak = sum(n for _, n, _, _ in live)
            self.at_peak = [(n, name, layer) for _, n, name, layer in live]
        return out

    def live(self):
        dead = [key for key, (ref, *_rest) in self.storages.items() if ref.expired()]
        for key in dead:
            del self.storages[key]
        return list(self.storages.values())


def planned_peak(job, decisions, cuda: bool):
    """The planner's level-2 lower bound for these layers (no LM head: the bench's stack has none)."""
    cost = CostModel(job, load_profile("h200" if cuda else "cpu"), "bf16" if cuda else "fp32")
    layer = cost.layer()
    block = solve_layout(layer_block_buffers(layer), 5.0)
    buffers = step_buffers([layer] * len(decisions), decisions, block.arena_bytes, 0.0, [1.0] * len(decisions))
    return lower_bound(buffers), layer


def run(args, keep, swap, recompute, offload):
    cuda = args.device == "cuda"
    device, dtype = torch.device(args.device), torch.bfloat16 if cuda else torch.float32
    job = load_job_config(None, [f"model.hidden_size={args.hidden}", f"model.num_heads={args.hidden // 128}",
                                 f"model.num_kv_heads={args.hidden // 128}", f"model.intermediate_size={args.inter}",
                                 f"model.num_layers={args.layers}", f"data.seq_len={args.seq_len}",
                                 "data.micro_batch_size=1", "cluster.num_workers=1", "model.vocab_size=256"])
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(DecoderLayer(job.model) for _ in range(args.layers)).to(device=device, dtype=dtype)
    decisions = [LayerPlan(i, keep, swap, recompute, offload) for i in range(args.layers)]
    stack = _Stack(layers)
    tokenwise.apply(stack, tokenwise.Config(), decisions)
    x = torch.randn(1, args.seq_len, args.hidden, device=device, dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(torch.arange(args.seq_len, device=device), job.model.head_dim, job.model.rope_theta, dtype)
    grad = torch.randn_like(x)
    tracker = LiveBytes(args.device)

    def step():
        out = x
        for index, layer in enumerate(layers):
            tracker.current_layer = index
            out = layer(out, cos, sin)
        tracker.current_layer = "backward"
        out.backward(grad)
        x.grad = None
        for p in layers.parameters():
            p.grad = None

    step()  # warm-up: the host pool's buffers are made here
    runtime = tokenwise.runtime_of(stack)
    before = [*layers.parameters(), x, grad, cos, sin, *(runtime.pool.buffers.values() if runtime else [])]
    tracker.known = {t.untyped_storage().data_ptr() for t in before}
    name = f"{keep}-{swap}-{recompute}-{'host' if offload else 'device'}"
    allocator = ""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if args.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200000)
    with tracker:
        step()
    if cuda:
        torch.cuda.synchronize()
        allocator = f", caching allocator's peak {(torch.cuda.max_memory_allocated() - base) / MIB:.1f} MiB"
        if args.snapshot:
            Path(args.snapshot).mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(Path(args.snapshot) / f"{name}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
    planned, layer = planned_peak(job, decisions, cuda)
    print(f"keep/swap/recompute {keep}/{swap}/{recompute} skeletal {'host' if offload else 'device'}: "
          f"measured peak {tracker.peak / MIB:.1f} MiB{allocator}, planned level-2 {planned / MIB:.1f} MiB "
          f"(skeletal {layer.skeletal_bytes / MIB:.1f}, token-wise {layer.token_wise_bytes / MIB:.1f} MiB a layer)",
          flush=True)
    grouped = defaultdict(lambda: [0, 0])
    for nbytes, op, where in tracker.at_peak:
        grouped[(op, where)][0] += nbytes
        grouped[(op, where)][1] += 1
    for (op, where), (nbytes, count) in sorted(grouped.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"    {nbytes / MIB:8.1f} MiB  {count:3d} x {op} (made in layer {where})")
    return tracker.peak, planned


class _Stack(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = layers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=1376)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--policies", default="0.4/0/0.6,0.46/0/0.54,0/0.26/0.74",
                        help="KEEP/SWAP/RECOMPUTE per run, comma-separated; each runs with the skeletal tensors on "
                             "the device and in host memory")
    parser.add_argument("--snapshot", help="folder for CUDA memory snapshots of each tracked step (GPU only)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    for policy in args.policies.split(","):
        keep, swap, recompute = (float(part) for part in policy.split("/"))
        for offload in (False, True):
            run(args, keep, swap, recompute, offload)


if __name__ == "__main__":
    main()
