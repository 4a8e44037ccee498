"""Whole-layer checkpointing inside the token-wise runtime (Chen et al., "Training Deep Nets with Sublinear Memory
Cost", arXiv 1604.06174; the per-layer form ALST runs on every layer, arXiv 2506.13996).

Why here and not DeepSpeed's checkpointing: a plan checkpoints some layers and splits others by token, and puts
some checkpointed layers' inputs in host memory and keeps others on the GPU. DeepSpeed's `checkpoint_in_cpu` is one
process-wide switch (read again in backward), and on CPU it loses its host copies, so neither the mix nor a CPU test
of the host copy could run there. In the token-wise runtime a checkpointed layer's input is one more role, stored
whole or copied to pinned host memory and prefetched one layer ahead like any skeletal tensor (`tokenwise._split`).

How (the non-reentrant scheme of `torch.utils.checkpoint`): the layer's forward runs once with gradients, under the
runtime's saved-tensor hooks; at its end every saved tensor is dropped except views of the layer input (restored
from its role) and the layer's own parameters. Autograd keeps the graph. The first unpack in backward restores the
input and runs the same forward again under capturing hooks; the forward is the same code on the same input, so
autograd saves the same tensors in the same order, and the n-th saved tensor of the first forward gets the n-th
of the replay: the backward then computes what the plain run computes, bit for bit. A tiled MLP (DeepSpeed's
TiledMLP) saves only its input and recomputes itself in its own backward, so the replay skips its work
(`tiled_mlp.InputOnly`): a checkpointed layer costs one forward less its MLP, not a whole forward as in ALST.
"""

from typing import List, Optional

import torch

from orchestrator.memory import tiled_mlp


class ReplayCapture:
    """The hooks of a replayed forward: every tensor autograd saves, in order (the replay's own graph is dropped;
    only these tensors are used, by the first forward's graph)."""

    def __init__(self, captured: List[torch.Tensor]):
        self.captured = captured
        self.context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self.context.__enter__()
        return self

    def __exit__(self, *exc):
        self.context.__exit__(*exc)
        self.context = None  # it holds our bound methods: a cycle that would keep `captured` until the collector ran
        return False

    def tag(self, tensors) -> None:
        """The forward names its tensors by role; a replay needs no names (it matches by order)."""

    def _pack(self, tensor: torch.Tensor) -> int:
        self.captured.append(tensor.detach())
        return len(self.captured) - 1

    def _unpack(self, index: int) -> torch.Tensor:
        return self.captured[index]


def replay_forward(layer, x: torch.Tensor, requires_grad: bool, cos: torch.Tensor, sin: torch.Tensor,
                   runtime) -> List[Optional[torch.Tensor]]:
    """The tensors the layer's forward saves, by order, recomputed from its restored input. `runtime.replaying`
    makes the layer's `activation_hooks` slot hand out a `ReplayCapture` for this one call."""
    captured: List[Optional[torch.Tensor]] = []
    runtime.replaying = captured
    tiling = layer.mlp.tiling
    if isinstance(tiling, tiled_mlp.TiledRunner):  # it saves only its input: the replay skips the MLP's work
        layer.mlp.tiling = tiled_mlp.replay_runner
    try:
        with torch.enable_grad():
            layer(x.detach().requires_grad_(requires_grad), cos, sin)
    finally:
        runtime.replaying = None
        layer.mlp.tiling = tiling
    return captured


def parameter_storages(layer: torch.nn.Module) -> set:
    """Storages of the layer's parameters: saved weights stay saved (dropping them would free nothing)."""
    return {p.untyped_storage().data_ptr() for p in layer.parameters() if p.numel()}
