"""Peak memory of the evaluation forward, predicted by counting the tensors alive at each phase of a layer, for the
chunked forward eval runs (`orchestrator.eval.forward`) and for the model's plain forward (what eval ran before,
kept for comparison); and measured on CPU from the allocator's own events (torch's profiler with profile_memory),
which is how the prediction is checked where no GPU is.

Why a prediction: a 1M-token forward of a 7B model either fits an H200 or dies after minutes; the count says which
before anything is allocated, and says what dominates. Counted: the weights, the residual stream, the RoPE tables,
q/k/v, the attention output and SDPA's log-sum-exp (fp32, [heads, S]), and per phase the short-lived tensors of
the ops as this code base writes them (RMSNorm's fp32 upcast, RoPE's rotate-half temporaries, the four SwiGLU
tensors). Not counted: an attention kernel's own scratch (`attention_workspace`, measured on CPU; a few MiB for the
GPU's flash kernels), the CUDA context and the caching allocator's rounding and fragmentation."""

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from spec.config import ModelConfig

LOGSUMEXP_BYTES = 4
"""SDPA's fused kernels return a float32 log-sum-exp per (head, position) next to the output."""


@dataclass
class ForwardPeak:
    weights: int
    resident: int
    """Alive through every layer: the residual stream (plain forward: also the layer's input) and the RoPE tables."""
    phases: Dict[str, int] = field(default_factory=dict)
    """Bytes alive on top of `resident` at the high point of each phase."""

    @property
    def activations(self) -> int:
        return self.resident + max(self.phases.values())

    @property
    def total(self) -> int:
        return self.weights + self.activations

    @property
    def phase(self) -> str:
        """The phase where the peak is."""
        return max(self.phases, key=self.phases.get)


def norm_bytes(positions: int, hidden: int, element: int) -> int:
    """RMSNorm's high point over its input: with an upcast, the fp32 copy, the fp32 product and its cast back;
    in fp32, the product and the output."""
    if element < 4:
        return positions * hidden * (4 + 4 + element)
    return positions * hidden * 2 * element


def predict_forward_peak(config: ModelConfig, length: int, element: int, chunk: Optional[int],
                         parameters: int, attention_workspace: int = 0) -> ForwardPeak:
    """Peak bytes of one sequence of `length` tokens through `hidden_states` (batch 1) with `element`-byte
    activations and weights: `chunk` positions at a time (eval's forward), or None for the model's plain forward.
    `parameters`: the model's parameter count (`orchestrator.model.count_parameters`)."""
    s, e, h, inter = length, element, config.hidden_size, config.intermediate_size
    q_dim, kv_dim, heads = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.num_heads
    rope = 2 * s * config.head_dim * e
    logsumexp = s * heads * LOGSUMEXP_BYTES + attention_workspace

    def projection(positions: int) -> int:
        """The normed input, raw q/k/v, and the rotated q with k's rotate-half temporaries (or q's own four)."""
        return positions * e * (h + q_dim + 2 * kv_dim + max(4 * q_dim, q_dim + 4 * kv_dim))

    if chunk is None:
        layer_input = s * h * e  # the caller's x stays alive while the layer makes its new residual stream
        phases = {
            "attention norm": norm_bytes(s, h, e),
            "q/k/v and RoPE": projection(s),
            "attention": s * e * (h + 2 * q_dim + 2 * kv_dim) + logsumexp,
            "MLP norm": s * h * e + norm_bytes(s, h, e),
            "MLP": s * e * (2 * h + 4 * inter),
            "final norm": norm_bytes(s, h, e),
        }
        positions = s * 8  # hidden_states keeps its int64 positions
        return ForwardPeak(parameters * e, layer_input + rope + positions, phases)
    c = min(chunk, s)
    qkv = s * e * (q_dim + 2 * kv_dim)
    phases = {
        "q/k/v and RoPE": qkv + max(norm_bytes(c, h, e), projection(c)),
        "attention": qkv + s * e * q_dim + logsumexp,
        "MLP": s * e * q_dim + max(3 * c * h * e, c * h * e + norm_bytes(c, h, e), c * e * (2 * h + 4 * inter)),
        "final norm": norm_bytes(c, h, e),
    }
    return ForwardPeak(parameters * e, s * h * e + rope, phases)


def cpu_peak_bytes(run: Callable[[], object]) -> int:
    """The most bytes the CPU allocator held at once during `run()`, above what it held before: from the
    allocation and free events torch's profiler records with profile_memory (each allocation's size, in order)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        run()
    events, pending = [], list(recorded.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak
