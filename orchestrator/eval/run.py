"""One evaluation: every model through perplexity by position and the passkey grid, one model in memory at a time,
forward-only (inference mode: no activations are saved), with the time and peak memory each part took."""

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from orchestrator.data import build_windows, corpus_bytes
from orchestrator.eval.forward import POSITION_CHUNK
from orchestrator.eval.memory import ForwardPeak, predict_forward_peak
from orchestrator.eval.models import EvalModel
from orchestrator.eval.passkey import REPEATED, Cell, Codec, min_length, model_scorer, run_grid
from orchestrator.eval.perplexity import Bucket, bucket_edges, bucketed, token_losses
from spec.config import JobConfig
from spec.errors import ConfigError
from spec.units import GIB


@dataclass
class ModelResult:
    label: str
    buckets: List[Bucket]
    cells: List[Cell]
    seconds: Dict[str, float] = field(default_factory=dict)
    peak_memory_gib: float = 0.0
    predicted_peak_gib: float = 0.0
    """The forward's peak at the longest length evaluated, weights included (`orchestrator.eval.memory`)."""


def resolve_lengths(models: List[EvalModel], job: JobConfig) -> None:
    """Fill eval.length (unset: the shortest of the models' default lengths, so every model has the same buckets)
    and eval.lengths (empty: [eval.length]) in the job, before `check_lengths`."""
    job.eval.length = job.eval.length or min(m.default_length for m in models)
    job.eval.lengths = list(job.eval.lengths) or [job.eval.length]


def check_lengths(models: List[EvalModel], job: JobConfig) -> None:
    """Lengths beyond what a model's RoPE setting covers, or too short for the prompt, refused in one line before
    anything is loaded."""
    longest = longest_length(job)
    for model in models:
        if longest > model.max_length:
            raise ConfigError(f"eval: {longest} tokens is beyond what {model.label} covers ({model.max_length}: its "
                              "model.max_position_embeddings, else the length it was trained at); lower eval.lengths "
                              "/ eval.length, or extend the context (model.rope_scaling.*) and train first")
        need = min_length(Codec(model.tokenizer_file), job.eval.digits)
        if min(job.eval.lengths) < need:
            raise ConfigError(f"eval.lengths ({min(job.eval.lengths)}) is too short for the passkey prompt of "
                              f"{model.label} ({need} tokens without filler); use lengths >= {need}")


def longest_length(job: JobConfig) -> int:
    return max([job.eval.length or job.data.seq_len, *job.eval.lengths])


def predicted_peak(model: EvalModel, job: JobConfig, dtype: torch.dtype) -> ForwardPeak:
    """The forward's peak bytes at the longest length evaluated (the parameters counted on the meta device)."""
    from orchestrator.model import LlamaModel, count_parameters

    with torch.device("meta"):
        parameters = count_parameters(LlamaModel(model.config))
    element = torch.empty((), dtype=dtype).element_size()
    return predict_forward_peak(model.config, longest_length(job), element, POSITION_CHUNK, parameters)


def check_memory(models: List[EvalModel], job: JobConfig, device: torch.device, dtype: torch.dtype,
                 capacity: Optional[int] = None) -> None:
    """A forward predicted to need more than the GPU holds (`capacity` bytes; default: the GPU's total, no check
    on CPU) is refused in one line before anything is loaded."""
    if capacity is None and device.type != "cuda":
        return
    capacity = capacity or torch.cuda.get_device_properties(device).total_memory
    for model in models:
        peak = predicted_peak(model, job, dtype)
        if peak.total > capacity:
            raise ConfigError(f"eval: {model.label} at {longest_length(job)} tokens needs about {peak.total / GIB:.1f} "
                              f"GiB on {device} ({peak.weights / GIB:.1f} GiB weights, the rest at its {peak.phase}), "
                              f"which holds {capacity / GIB:.1f} GiB; lower eval.lengths / eval.length or use a "
                              "larger GPU")


def holdout_windows(job: JobConfig, length: int, vocab_size: int, codec: Optional[Codec] = None) -> List[np.ndarray]:
    """eval.sequences windows of length + 1 tokens from the data's holdout split (never trained on); the bundled
    corpus is re-encoded with the model's tokenizer when it has one (its byte ids mean nothing to that model)."""
    if job.data.source == "corpus" and codec is not None and codec.tokenizer is not None:
        tokens = np.asarray(codec.encode(corpus_holdout_text(job)), dtype=np.int64)
        windows = [tokens[i * length:i * length + length + 1] for i in range((len(tokens) - 1) // length)]
    else:
        source = build_windows(dataclasses.replace(job.data, seq_len=length, packing="stream"), vocab_size,
                               job.train.seed)
        windows = [source.window(i, holdout=True) for i in range(min(job.eval.sequences, source.num_holdout))]
    if not windows:
        raise ConfigError(f"eval: the holdout split of data.source={job.data.source} holds no window of {length} "
                          f"tokens; raise data.holdout_fraction, lower eval.length, or point data.* at more text")
    return windows[:job.eval.sequences]


def corpus_holdout_text(job: JobConfig) -> str:
    """The tail of the bundled corpus that training leaves out (data.holdout_fraction), as text."""
    text = corpus_bytes()
    return text[int(len(text) * (1 - job.data.holdout_fraction)):].tobytes().decode("utf-8", "ignore")


def filler_tokens(job: JobConfig, codec: Codec, vocab_size: int) -> np.ndarray:
    """What the passkey hides in: the holdout text (re-encoded with the model's tokenizer for the bundled corpus),
    or the classic repeated sentence."""
    if job.eval.filler == "repeated":
        return np.asarray(codec.encode(REPEATED * 8))
    if job.data.source == "corpus":
        return np.asarray(codec.encode(corpus_holdout_text(job)))
    windows = holdout_windows(job, min(job.data.seq_len, 4096), vocab_size)
    return np.concatenate([w[:-1] for w in windows])


def evaluate(model: EvalModel, job: JobConfig, device: torch.device, dtype: torch.dtype,
             built: Optional[torch.nn.Module] = None) -> ModelResult:
    """Perplexity by position and the passkey grid of one model (`built`: a model already in memory, for tests)."""
    started = time.time()
    net = built if built is not None else model.build(device, dtype, job.train.attention_kernel)
    reset_peak(device)
    seconds = {"load": time.time() - started}
    length, codec = job.eval.length or job.data.seq_len, Codec(model.tokenizer_file)
    windows = holdout_windows(job, length, model.config.vocab_size, codec)
    started = time.time()
    losses = (token_losses(net, torch.from_numpy(w)) for w in
              tqdm(windows, desc=f"{model.label} perplexity", unit="seq", leave=False))
    buckets = bucketed(losses, bucket_edges(length, job.eval.first_bucket))
    seconds["perplexity"] = time.time() - started
    started, spec = time.time(), job.eval
    with tqdm(total=len(spec.lengths) * len(spec.depths) * spec.trials, desc=f"{model.label} passkey",
              unit="trial", leave=False) as bar:
        cells = run_grid(model_scorer(net), codec, filler_tokens(job, codec, model.config.vocab_size), spec.lengths,
                         spec.depths, spec.trials, spec.digits, spec.seed, bar)
    seconds["passkey"] = time.time() - started
    return ModelResult(model.label, buckets, cells, seconds, peak_gib(device),
                       predicted_peak(model, job, next(net.parameters()).dtype).total / GIB)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """GPU: the allocator's peak since the model was built; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
