"""Sequence-tiled MLP (ALST: Bekman et al., "Arctic Long Sequence Training: Scalable And Efficient Training For
Multi-Million Token Sequences", arXiv 2506.13996), through DeepSpeed's own `TiledMLP`
(`deepspeed.runtime.sequence_parallel.ulysses_sp`, DeepSpeed 0.19.8).

At long context the MLP's intermediates are a layer's largest tensors: gate, up, silu(gate) and their product are
each tokens x intermediate_size (3.5 x the hidden size for Llama-3), saved for backward and again as gradients
in backward. TiledMLP runs the forward in tiles of tokens under no_grad and saves only the MLP's input; backward
recomputes one tile's MLP with gradients and backpropagates it before the next, so what exists at any time is one
tile's intermediates (tile x intermediate_size), whatever the sequence. Cost: one more MLP forward per step.

DeepSpeed's function fits our MLP as it is (it calls `fn(mlp, tile)`, here the MLP's untiled forward, and with
ZeRO it marks the MLP's trainable parameters' gradients ready only after the last tile). Tiles: ALST's rule, about
hidden_size tokens each, so a tile's intermediates are hidden x intermediate elements. Under a token-wise plan the
MLP's input (`mlp_norm_out`) is the only MLP tensor saved, split like any other; recomputation stops at it.
"""

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch


@dataclass
class Config:
    tile_tokens: Optional[int] = None
    """Tokens per tile; None: the model's hidden size (ALST's rule)."""


class TiledRunner:
    """The `MLP.tiling` slot: the MLP through DeepSpeed's TiledMLP in tiles of `tile_tokens` tokens."""

    def __init__(self, tile_tokens: int):
        self.tile_tokens = tile_tokens

    def __call__(self, mlp, x: torch.Tensor) -> torch.Tensor:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        tiles = min(x.shape[-2], max(1, math.ceil(x.numel() // x.shape[-1] / self.tile_tokens)))
        trainable = [p for p in mlp.parameters() if p.requires_grad]
        return TiledMLP.apply(_untiled, mlp, x, tiles, trainable)


class InputOnly(torch.autograd.Function):
    """What TiledMLP does for autograd, without its work: saves the MLP's input, the one tensor TiledMLP saves, and
    returns no values (a zero-stride tensor of the output's shape). A checkpointed layer's replay
    (`layer_replay`) needs only the tensors the first forward saved, so it runs the MLP through this: no MLP
    forward in the replay and no tokens x hidden output of it. Never reaches a backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.new_zeros(()).expand(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise AssertionError("a replayed layer's graph is dropped; its MLP has no backward")


def replay_runner(mlp, x: torch.Tensor) -> torch.Tensor:
    """The `MLP.tiling` slot while a checkpointed layer is replayed (`InputOnly`)."""
    return InputOnly.apply(x)


def _untiled(mlp, x: torch.Tensor) -> torch.Tensor:
    return mlp.untiled(x)


def apply(model, config: Config, layers: Iterable[int]) -> None:
    """Tile the MLP of these layers."""
    runner = TiledRunner(config.tile_tokens or model.config.hidden_size)
    for index in layers:
        model.layers[index].mlp.tiling = runner


def tile_tokens(hidden_size: int) -> int:
    """ALST's tile length, which the planner counts as the MLP's transient (`planner.cost_model`)."""
    return hidden_size
