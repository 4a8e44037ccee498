"""How a layer's token fractions become whole token counts: one function for the planner and the runtime, so
the bytes a plan lays out are exactly the bytes the runtime stores."""

from typing import Tuple

FRACTION_DECIMALS = 4
"""Plan files carry fractions rounded to this many decimals; layouts are computed from the rounded values."""


def token_ranges(swap_fraction: float, recompute_fraction: float, seq_len: int) -> Tuple[int, int, int]:
    """(kept, swapped, recomputed) tokens of a sequence; swap and recompute rounded to whole tokens, the rest kept."""
    swapped = int(round(swap_fraction * seq_len))
    recomputed = min(seq_len - swapped, int(round(recompute_fraction * seq_len)))
    return seq_len - swapped - recomputed, swapped, recomputed


def kept_blocks(keep_ratio: float, num_blocks: int) -> int:
    """Blocks a token-eliminated layer keeps of a sequence's `num_blocks` (at least one): the runtime's rule and the
    planner's, so a sparse layer's planned bytes are the ones it stores."""
    return min(num_blocks, max(1, int(keep_ratio * num_blocks + 1e-6)))
