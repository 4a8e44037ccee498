"""RoPE inverse frequencies with the context-extension scalings long-context users need (model.rope_scaling).

Why here, and written as Hugging Face writes them: a model fine-tuned from a published checkpoint must compute the
frequencies that checkpoint was trained with, bit for bit where possible (Llama 3.1-3.3 ship `llama3` scaling; a
wrong frequency set loads silently and changes the logits), and a model extended here must be served elsewhere
with the same ones. So the formulas follow transformers' `modeling_rope_utils` operation by operation, and the
tests compare against it at positions beyond 100K.

- none: theta^(-2i/d), the plain RoPE (the same operations as before scaling existed, so existing runs are
  unchanged bit for bit).
- linear (position interpolation, Chen et al. 2023, arXiv:2306.15595): every frequency divided by `factor`.
- llama3 (Llama 3.1): wavelengths longer than original/low_freq_factor divided by `factor`, shorter than
  original/high_freq_factor kept, a linear ramp in between.
- yarn (Peng et al. 2023, arXiv:2309.00071): per dimension a ramp between interpolation (/factor) and
  extrapolation, set by the rotations beta_fast/beta_slow within the original context; cos and sin are scaled by
  the attention factor (default 0.1 ln(factor) + 1), which scales the attention logits by its square.
"""

import math
from typing import Optional, Tuple

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling=None,
                        device: Optional[torch.device] = None) -> Tuple[torch.Tensor, float]:
    """The [head_dim / 2] inverse frequencies and the factor cos and sin are multiplied by."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    kind = "none" if scaling is None else scaling.type
    if kind == "none":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling.factor, 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, device)
    raise ValueError(f"model.rope_scaling.type {kind!r} is not computed here (the config check refuses it)")


def _llama3(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    original = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(head_dim: int, theta: float, scaling, device) -> Tuple[torch.Tensor, float]:
    factor, original = scaling.factor, scaling.original_max_position_embeddings
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)
