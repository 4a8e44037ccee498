"""LeMo token elimination (Wang et al., "LeMo: Enabling LEss Token Involvement for MOre Context Fine-tuning",
arXiv 2501.09767; published as Jenga, USENIX ATC'25).

In long inputs most tokens receive little attention in a given layer, and which ones matter changes with the
input and the layer. So in each sparse layer the sequence is cut into blocks of 64 tokens, each block is scored
by how much attention mass its keys receive, and only the top `keep_ratio` of the blocks enter the attention
block: their rows are gathered, normed, projected, rotated with their ORIGINAL RoPE positions, attend causally
among themselves (kept indices are sorted, so order and causality hold) and are scattered back. An eliminated
row gets a zero attention output, so the residual stream carries it unchanged to the MLP and the next layer,
which re-scores every token: elimination is per layer, a token dropped here may return there. The attention
block's saved activations (norm input, q/k/v, attention output and its log-sum-exp, o_proj input) therefore
scale with the kept tokens; no N x N map is made.

What is eliminated: the attention block only, as LeMo's code does. The MLP, both norms' residual inputs and the
residual stream stay full length (LeMo's MLP forward is exact for all tokens; its channel pruning of the MLP's
saved tensors is a separate, biased backward approximation not built here). This changes the FORWARD function,
so early layers and the last layer stay dense by default.

Block score (LeMo's ground truth, `flash_block.py`): M[I, J] = max over i in I, j in J, i >= j of sum_h ReLU(q_i .
k_j) / sqrt(d_h); LeMo's key-block informativeness is the column sum S_J = sum_I M[I, J]. Under the causal mask
block J is seen by num_blocks - J query blocks, so a sum ranks blocks by position before content (at random init it
keeps exactly the first blocks); we take the column MEAN over the query blocks that see J. We score with the rotated
q and k, i.e. the logits attention really uses (LeMo trains its predictors on pre-RoPE q and k). As in LeMo, a
block's score depends on later queries: the selection looks ahead within the sequence (a fine-tuning approximation;
do not use the sparse forward to measure causal perplexity of a model). It is computed under no_grad, a few query
blocks at a time against the causal prefix of keys, so the working set is SCORE_CHUNK_ELEMENTS, not N x N; on CUDA
one Triton kernel (`token_elim_triton`) keeps the logits on chip. The kept indices are a pure function of the layer
input (no randomness); the last ones are kept on the layer (`layer.token_elim.last_kept`) for inspection. A sparse
layer is a plain `DecoderLayer` whose `token_elim` slot holds its `LayerElimination`, which runs its forward and its
recomputation.

Under a token-wise swap/recompute plan (`tokenwise`) the forward tags the layer input (full length, skeletal), the
kept rows' attention tensors (normed rows, q, k, v, attention output: their token axis is the kept sequence) and the
full-length MLP tensors, so the plan's keep / swap / recompute shares apply to the kept rows in the attention half.
The kept indices are tagged too: recomputation (`eliminated_recompute`) reuses them and never re-scores.
"""

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

import torch

from spec import activations as role
from spec.config.schema import TokenElimConfig
from spec.errors import ConfigError
from orchestrator.model import DecoderLayer, merge_heads
from spec.activations import kept_blocks

Config = TokenElimConfig
"""The job's `token_elim` section: keep ratio, block size, predictors (its `enabled` and dense layers say where
`memory.apply_plan` applies it)."""
SCORE_CHUNK_ELEMENTS = 1 << 24
"""Query-key scores held at once while scoring (64 MiB in fp32)."""
KEPT_TOKENS = "kept_tokens"
"""The tag of a sparse layer's kept token indices (context for recomputation, not a role)."""


@dataclass
class LayerElimination:
    """One sparse layer's setting, in the layer's `token_elim` slot: runs the layer's forward and recomputation."""

    keep_ratio: float
    block_size: int = 64
    last_kept: Optional[torch.Tensor] = None
    """Token indices [B, kept] of the last forward (sorted)."""
    predictor: Optional[Any] = None
    """A trained block-score estimator (`token_elim_predictors`); None: exact scores. Not a submodule of the layer, so
    DeepSpeed neither trains nor checkpoints it."""

    def num_kept_blocks(self, num_blocks: int) -> int:
        return kept_blocks(self.keep_ratio, num_blocks)

    def forward(self, layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return eliminated_forward(layer, x, cos, sin)

    def recompute_tokens(self, layer: DecoderLayer, group: str, skeletal: dict, cos: torch.Tensor,
                         sin: torch.Tensor, start: int, length: int, context: dict) -> dict:
        return eliminated_recompute(layer, group, skeletal, cos, sin, start, length, context)


def apply(model, config: Config, layers: Iterable[int]) -> Dict[int, float]:
    """Make these layers sparse with the section's keep ratio and block size, scored by its predictors if it names
    a file (exact scores otherwise); the layers' parameters stay the same objects (DeepSpeed ZeRO still finds and
    gathers them). Returns the keep ratio of each layer made sparse."""
    ratios = {index: config.keep_ratio for index in layers}
    predictors = _predictors(model, config, ratios) if ratios and config.predictors else {}
    for index in ratios:
        model.layers[index].token_elim = LayerElimination(config.keep_ratio, config.block_size,
                                                          predictor=predictors.get(index))
    return ratios


def _predictors(model, config: Config, ratios: Dict[int, float]) -> dict:
    """The predictors file's estimators of these layers (the file's own checks: `load_predictors`)."""
    from orchestrator.memory.token_elim_predictors import load_predictors  # it imports this module

    predictors = load_predictors(config.predictors, model.config, config.block_size)
    missing = sorted(set(ratios) - set(predictors))
    if missing:
        raise ConfigError(f"token_elim.predictors ({config.predictors}) has no predictor for sparse layers "
                          f"{missing}; retrain it with these token_elim.dense_* settings")
    return predictors


def eliminated_forward(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x + attention over the kept rows (zero elsewhere), then the MLP on every row."""
    kept = kept_token_indices(layer, x, cos, sin)
    layer.token_elim.last_kept = kept
    if layer.activation_hooks is not None and torch.is_grad_enabled():
        return _forward_under_hooks(layer, x, cos, sin, kept)
    residual = x + attention_on_kept(layer, x, cos, sin, kept)
    return residual + layer.mlp(layer.mlp_norm(residual))


def _forward_under_hooks(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         kept: torch.Tensor) -> torch.Tensor:
    """The same function as the plain sparse forward, with its intermediates tagged for the token-wise runtime.
    The attention norm runs on every row and its output is gathered, so the norm saves the layer input (skeletal,
    kept anyway) rather than a gathered copy the runtime could not split; the per-row values are the same."""
    sequences = torch.arange(x.shape[0], device=x.device)[:, None]
    hooks = layer.activation_hooks(layer, x, cos, sin)
    with hooks:
        normed = layer.attn_norm(x)[sequences, kept]
        q, k, v = layer.attn.project(normed, cos[kept][:, None], sin[kept][:, None])
        hooks.tag({role.LAYER_INPUT: x, KEPT_TOKENS: kept, role.ATTN_NORM_OUT: normed, role.Q: q, role.K: k,
                   role.V: v})
        attn_out = layer.attn.attend(q, k, v)
        hooks.tag({role.ATTN_OUT: attn_out})
        attention = torch.zeros_like(x).index_put((sequences, kept), layer.attn.o_proj(merge_heads(attn_out)))
        mlp = layer.mlp_tensors(x + attention)
        hooks.tag({key: value for key, value in mlp.items() if key != "out"})
        return mlp["out"]


def eliminated_recompute(layer: DecoderLayer, group: str, skeletal: dict, cos: torch.Tensor, sin: torch.Tensor,
                         start: int, length: int, context: dict) -> dict:
    """A sparse layer's token-wise tensors for a token range, from the skeletal tensors and the kept indices its
    forward chose (`context[KEPT_TOKENS]`, never re-scored). Attention tensors: [start, start + length) indexes the
    kept sequence; MLP tensors: the full one, where only the kept rows in the range get an attention output."""
    kept, x = context[KEPT_TOKENS], skeletal[role.LAYER_INPUT]
    sequences = torch.arange(x.shape[0], device=x.device)[:, None]
    if group == "attention":
        rows = kept[:, start:start + length]
        normed = layer.attn_norm(x[sequences, rows])
        q, k, v = layer.attn.project(normed, cos[rows][:, None], sin[rows][:, None])
        return {role.ATTN_NORM_OUT: normed, role.Q: q, role.K: k, role.V: v}
    x = x.narrow(1, start, length)
    attention = torch.zeros_like(x)
    bounds = torch.searchsorted(kept, torch.tensor([start, start + length], device=kept.device).expand(
        kept.shape[0], 2).contiguous()).tolist()
    for b, (first, last) in enumerate(bounds):  # kept is sorted: the range's kept rows are one slice of it
        if last > first:
            out = skeletal[role.ATTN_OUT][b:b + 1, :, first:last]
            attention[b, kept[b, first:last] - start] = layer.attn.o_proj(merge_heads(out))[0]
    return layer.mlp_tensors(x + attention)


def attention_on_kept(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      kept: torch.Tensor) -> torch.Tensor:
    """The attention block on rows `kept` [B, K] with their original positions, scattered into zeros [B, S, d]."""
    sequences = torch.arange(x.shape[0], device=x.device)[:, None]
    rows = x[sequences, kept]  # indexing saves the indices for backward; gather would also keep all of x
    out = layer.attn(layer.attn_norm(rows), cos[kept][:, None], sin[kept][:, None])
    return torch.zeros_like(x).index_put((sequences, kept), out)


@torch.no_grad()
def kept_token_indices(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Token indices [B, K * block] of the most informative blocks of each sequence, ascending."""
    state, seq = layer.token_elim, x.shape[1]
    block = state.block_size  # data.seq_len is a multiple of it (the job config's rule)
    normed = layer.attn_norm(x)
    if state.predictor is not None:
        scores = state.predictor.to(x.device).scores(normed)
    else:
        scores = block_informativeness(*rotated_query_key(layer, normed, cos, sin), block)
    blocks = scores.topk(state.num_kept_blocks(seq // block), dim=1).indices.sort(dim=1).values
    return (blocks[..., None] * block + torch.arange(block, device=x.device)).flatten(1)


def rotated_query_key(layer: DecoderLayer, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The layer's q [B, H, S, D] and k [B, Hkv, S, D] after RoPE, from its normed input."""
    (batch, seq, _), attn = normed.shape, layer.attn
    q = attn.rope(attn.q_proj(normed).view(batch, seq, attn.num_heads, -1).transpose(1, 2), cos, sin)
    k = attn.rope(attn.k_proj(normed).view(batch, seq, attn.num_kv_heads, -1).transpose(1, 2), cos, sin)
    return q, k


def block_informativeness(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """S_J = mean over I >= J of max_{i in I, j in J, i >= j} sum_h ReLU(q_i . k_j) / sqrt(d): [B, num_blocks] from
    q [B, H, S, D] and k [B, Hkv, S, D], a few query blocks at a time against their causal key prefix."""
    if _triton_scoring(q, block):
        from orchestrator.memory.token_elim_triton import block_column_sums

        return column_means(block_column_sums(q, k, block))
    num_blocks = q.shape[2] // block
    scores = q.new_zeros(q.shape[0], num_blocks, dtype=torch.float32)
    for first, last, tiles in _tile_chunks(q, k, block):
        scores[:, :last] += tiles.sum(1)
    return column_means(scores)


def _triton_scoring(q: torch.Tensor, block: int) -> bool:
    """The fused kernel on CUDA (LONGTRAIN_TORCH_SCORING=1 forces the chunked torch path, for comparison)."""
    if not q.is_cuda or os.environ.get("LONGTRAIN_TORCH_SCORING") == "1":
        return False
    power_of_two = lambda n: n >= 16 and n & (n - 1) == 0
    return importlib.util.find_spec("triton") is not None and power_of_two(q.shape[-1]) and power_of_two(block)


def block_score_map(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """The tile maxima M [B, I, J] themselves (zero for J > I): predictor targets; (N / block)^2 per sequence."""
    num_blocks = q.shape[2] // block
    scores = q.new_zeros(q.shape[0], num_blocks, num_blocks, dtype=torch.float32)
    for first, last, tiles in _tile_chunks(q, k, block):
        scores[:, first:last, :last] = tiles
    return scores


def column_means(column_sums: torch.Tensor) -> torch.Tensor:
    """Divide each key block's sum by the query blocks that see it (num_blocks - J under the causal mask)."""
    num_blocks = column_sums.shape[-1]
    return column_sums / torch.arange(num_blocks, 0, -1, device=column_sums.device)


def _tile_chunks(q: torch.Tensor, k: torch.Tensor, block: int):
    """(first, last, tiles [B, last - first, last]) for consecutive query-block ranges; SCORE_CHUNK_ELEMENTS bound the
    scores held at once."""
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.view(batch, kv_heads, heads // kv_heads, seq, dim)
    num_blocks = seq // block
    step = max(1, SCORE_CHUNK_ELEMENTS // (batch * heads * block * seq))
    for first in range(0, num_blocks, step):
        last = min(num_blocks, first + step)
        rows = grouped[:, :, :, first * block:last * block].reshape(batch, kv_heads, -1, dim)  # GQA: k not repeated
        logits = (rows @ k[:, :, :last * block].transpose(-1, -2)).float()  # one chunk in fp32
        tile = logits.relu_().sum(1).view(batch, -1, (last - first) * block, last * block).sum(1) / dim ** 0.5
        query_pos = torch.arange(first * block, last * block, device=q.device)[:, None]
        tile.masked_fill_(torch.arange(last * block, device=q.device)[None, :] > query_pos, 0.0)
        yield first, last, tile.view(batch, last - first, block, last, block).amax(dim=(2, 4))
