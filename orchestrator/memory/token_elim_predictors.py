"""Per-layer predictors of LeMo's block scores (LeMo/Jenga, arXiv 2501.09767: models/predictor.py and
trainer/predictor_trainer.py in its artifact).

Why: exact scoring (`token_elim.block_informativeness`) costs one more attention forward per sparse layer, all
queries against all keys. A small network reading the layer's normed input estimates the block map instead, at
(N / block)^2 cost and with weights independent of N; it is trained once per model and corpus with the model frozen,
and is never trained by the fine-tuning run (it is not a submodule of the model).

Shape (smaller than LeMo's, measured by recall): each 64-token block is pooled (mean and max of its normed rows,
2 x hidden features); two branches, q and k, each Linear(2h, width) -> ReLU -> Linear(width, heads * rank), give a
per-head query and key vector per block; M^[I, J] = sum_h q^_I^h . k^_J^h below the diagonal, plus a third branch
for a block's own (diagonal, causal) tile, which dominates the late blocks' scores; the key-block score is the
causal column mean, as for the exact scores. LeMo feeds each head's whole block (64 x d_h values) instead of
pooling. Training: SmoothL1 between M^ and the exact tile map M (entries I >= J, divided by its mean on the first
batch) plus the MSE of the per-sequence standardised column scores (what the ranking uses).
Quality: top-k block recall on held-out windows, k = the blocks the keep ratio keeps, next to the recall of
keeping the last k blocks (the exact scores favour late blocks; a predictor that does not beat that adds nothing).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from spec.config import JobConfig, ModelConfig, TokenElimConfig
from spec.errors import ConfigError
from orchestrator.memory import token_elim
from orchestrator.model import rope_tables

FORMAT_VERSION = 1
PREDICTORS_FILE = "token_elim_predictors.pt"


class BlockScorePredictor(nn.Module):
    """Estimates one layer's block map from its normed input [B, S, hidden]."""

    def __init__(self, hidden_size: int, num_heads: int, block_size: int, width: int = 128, rank: int = 16):
        super().__init__()
        self.num_heads, self.rank, self.block_size = num_heads, rank, block_size
        self.query = nn.Sequential(nn.Linear(2 * hidden_size, width), nn.ReLU(), nn.Linear(width, num_heads * rank))
        self.key = nn.Sequential(nn.Linear(2 * hidden_size, width), nn.ReLU(), nn.Linear(width, num_heads * rank))
        self.diagonal = nn.Sequential(nn.Linear(2 * hidden_size, width), nn.ReLU(), nn.Linear(width, 1))
        self.register_buffer("target_scale", torch.ones(()))

    def score_map(self, normed: torch.Tensor) -> torch.Tensor:
        """M^ [B, I, J] in target units (zero for J > I)."""
        batch, seq, hidden = normed.shape
        blocks = normed.float().view(batch, seq // self.block_size, self.block_size, hidden)
        pooled = torch.cat((blocks.mean(2), blocks.amax(2)), dim=-1)
        q = self.query(pooled).view(batch, -1, self.num_heads, self.rank).transpose(1, 2)
        k = self.key(pooled).view(batch, -1, self.num_heads, self.rank).transpose(1, 2)
        own = torch.diag_embed(self.diagonal(pooled).squeeze(-1))  # a block's own causal tile is special
        return (q @ k.transpose(-1, -2)).sum(1).tril(-1) + own

    @torch.no_grad()
    def scores(self, normed: torch.Tensor) -> torch.Tensor:
        """Key-block scores [B, num_blocks], ranked like `token_elim.block_informativeness`."""
        return token_elim.column_means(self.score_map(normed).sum(1))


@dataclass
class PredictorReport:
    path: Path
    steps: int
    recall: Dict[int, float]
    """Top-k block recall per sparse layer on held-out windows."""
    last_blocks_recall: Dict[int, float] = field(default_factory=dict)
    """The recall of keeping the last k blocks, the baseline a predictor must beat."""
    final_loss: Dict[int, float] = field(default_factory=dict)


def default_path(job: JobConfig) -> Path:
    """Next to the model's weights (model.init_from) when there are some, else in the working directory."""
    if not job.model.init_from:
        return Path(PREDICTORS_FILE)
    weights = Path(job.model.init_from.split(":")[0])
    return weights / PREDICTORS_FILE if weights.is_dir() else weights.with_name(weights.stem + "." + PREDICTORS_FILE)


def train_predictors(job: JobConfig, model, windows, steps: int, out: Path, holdout_sequences: int = 8,
                     lr: float = 3e-3) -> PredictorReport:
    """Train one predictor per sparse layer of `job.token_elim` on `model` (frozen, dense forward), save them. The
    job is loaded with token_elim enabled (`longtrain train-predictors`), so its config has a sparse layer."""
    config = job.token_elim
    layers = sorted(config.keep_ratios(len(model.layers)))
    assert layers, "the job config leaves no sparse layer (JobConfig checks this with token_elim.enabled=true)"
    model.eval().requires_grad_(False)
    predictors = {i: BlockScorePredictor(job.model.hidden_size, job.model.num_heads, config.block_size)
                  for i in layers}
    optimizers = {i: torch.optim.Adam(p.parameters(), lr=lr) for i, p in predictors.items()}
    losses: Dict[int, float] = {}
    rng = torch.Generator().manual_seed(job.train.seed)
    for step in range(steps):
        picks = torch.randint(0, windows.num_train, (job.data.micro_batch_size,), generator=rng).tolist()
        inputs = torch.stack([torch.from_numpy(windows.window(i)[:-1]) for i in picks])
        for index, (normed, target) in layer_targets(model, inputs, layers, config.block_size).items():
            losses[index] = _train_step(predictors[index], optimizers[index], normed, target, first=step == 0)
    recall, baseline = held_out_recall(model, predictors, windows, config, holdout_sequences)
    save_predictors(out, predictors, job.model, config.block_size, recall)
    return PredictorReport(out, steps, recall, baseline, losses)


def _train_step(predictor: BlockScorePredictor, optimizer, normed, target, first: bool) -> float:
    if first:
        causal = torch.ones_like(target[0], dtype=torch.bool).tril()
        predictor.target_scale.fill_(target[:, causal].mean().clamp(min=1e-6))
    predicted = predictor.score_map(normed)
    causal = torch.ones_like(target[0], dtype=torch.bool).tril()
    ranking = F.mse_loss(_standardised(token_elim.column_means(predicted.sum(1))),
                         _standardised(token_elim.column_means(target.sum(1))))
    loss = F.smooth_l1_loss(predicted[:, causal], target[:, causal] / predictor.target_scale) + ranking
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _standardised(scores: torch.Tensor) -> torch.Tensor:
    return (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp(min=1e-6)


@torch.no_grad()
def layer_targets(model, inputs: torch.Tensor, layers: List[int], block: int) -> Dict[int, tuple]:
    """(normed layer input, exact tile map) of each listed layer in a dense forward of `inputs`."""
    seq = inputs.shape[1]
    captured: Dict[int, torch.Tensor] = {}
    handles = [model.layers[i].attn_norm.register_forward_hook(
        lambda module, args, out, i=i: captured.setdefault(i, out)) for i in layers]
    try:
        model.hidden_states(inputs)
    finally:
        for handle in handles:
            handle.remove()
    cos, sin = rope_tables(torch.arange(seq), model.config.head_dim, model.config.rope_theta, captured[layers[0]].dtype,
                           model.config.rope_scaling)
    return {i: (captured[i], token_elim.block_score_map(
        *token_elim.rotated_query_key(model.layers[i], captured[i], cos, sin), block)) for i in layers}


@torch.no_grad()
def held_out_recall(model, predictors: Dict[int, BlockScorePredictor], windows, config: TokenElimConfig,
                    sequences: int) -> Tuple[Dict[int, float], Dict[int, float]]:
    """Mean |predicted top-k & exact top-k| / k per layer over held-out windows, and the same for keeping the last
    k blocks."""
    count = min(sequences, windows.num_holdout)
    if count < 1:
        raise ConfigError("data.holdout_fraction leaves no held-out window to measure predictor recall on; raise it")
    inputs = torch.stack([torch.from_numpy(windows.window(i, holdout=True)[:-1]) for i in range(count)])
    recall, baseline = {}, {}
    for index, (normed, target) in layer_targets(model, inputs, sorted(predictors), config.block_size).items():
        exact = token_elim.column_means(target.sum(1))
        keep = token_elim.LayerElimination(config.keep_ratio, config.block_size).num_kept_blocks(exact.shape[1])
        recall[index] = _recall(predictors[index].scores(normed), exact, keep)
        baseline[index] = _recall(torch.arange(exact.shape[1], dtype=torch.float32).expand_as(exact), exact, keep)
    return recall, baseline


def _recall(guess: torch.Tensor, exact: torch.Tensor, keep: int) -> float:
    truth = F.one_hot(exact.topk(keep, dim=1).indices, exact.shape[1]).sum(1)
    chosen = F.one_hot(guess.topk(keep, dim=1).indices, exact.shape[1]).sum(1)
    return (truth * chosen).sum().item() / (keep * exact.shape[0])


def save_predictors(path: Path, predictors: Dict[int, BlockScorePredictor], model: ModelConfig, block: int,
                    recall: Dict[int, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT_VERSION, "shape": _shape(model), "block_size": block, "recall": recall,
                "layers": {i: p.state_dict() for i, p in predictors.items()}}, path)


def load_predictors(path: str, model: ModelConfig, block: int) -> Dict[int, BlockScorePredictor]:
    """The predictors of a file written by `longtrain train-predictors`, refused in one line if made for another
    model shape or block size."""
    if not Path(path).is_file():
        raise ConfigError(f"token_elim.predictors ({path}) does not exist; make it with longtrain train-predictors")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != FORMAT_VERSION or saved["shape"] != _shape(model) or saved["block_size"] != block:
        raise ConfigError(f"token_elim.predictors ({path}) was trained for another model shape or block size "
                          f"({saved.get('shape')}, block {saved.get('block_size')}); retrain it with "
                          "longtrain train-predictors")
    predictors = {}
    for index, state in saved["layers"].items():
        predictors[int(index)] = BlockScorePredictor(model.hidden_size, model.num_heads, block)
        predictors[int(index)].load_state_dict(state)
    return predictors


def _shape(model: ModelConfig) -> Dict[str, int]:
    return {k: getattr(model, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")}
