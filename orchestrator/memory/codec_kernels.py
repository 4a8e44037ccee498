"""How the compression codecs (Mesa int8, S2A int4, WTA-CRS rows) run their elementwise work: the functions as
written, op by op, or each compiled by torch.compile into one fused kernel (`train.elementwise=compiled` on CUDA,
set by `orchestrator.elementwise.install`).

Why: op by op, encoding a tensor passed over it about ten times (range, fp32 upcast, offset, scale, noise, floor,
clamp, cast, packing) and decoding about five, each pass a full read and write of a [tokens, width] tensor; on an
H200 at 64K tokens Mesa int8 ran at 0.68x store_all's MFU. Compiled, the range is one reduction pass and encode and
decode one pass each (the rounding noise is computed in the kernel from the element's index, `quant_int8`).

One switch, process-wide: each codec module calls its pure functions through `kernel(fn, device)`, which is `fn`
itself unless compiled kernels are installed for that device's type (CUDA: a CPU tensor in a process that trains on a
GPU still runs op by op), so both paths run the same arithmetic. `fused(device)` tells a caller it may work on a
whole tensor at once: the op-by-op path goes a block of rows at a time to bound its fp32 temporaries, a fused kernel
has none.
"""

from typing import Any, Callable, Dict, Optional

import torch

_compile: Optional[Callable] = None
_device_type = "cuda"
_compiled: Dict[Callable, Callable] = {}


def compile_codec(fn: Callable, backend: Any = "inductor") -> Callable:
    """`fn` under torch.compile with each tensor argument's first size (rows: tokens, chunks) dynamic and its other
    sizes (groups, widths) static, one graph per width.

    Why: with every size a symbol (`dynamic=True` alone) a kernel finds an element's group by dividing its flat
    index by runtime sizes, 64-bit divisions of tens of instructions each on a GPU; on an H200 at 64K tokens the
    Mesa codecs then moved 400-550 GB/s, a tenth of the memory's bandwidth, with the matmuls unchanged. Static
    widths make those divisions by constants. A model has a few widths (hidden, intermediate), each traced once in
    the first step; the rows stay dynamic, so chunks of any length reuse the graph."""
    compiled = torch.compile(fn, dynamic=True, backend=backend)

    def mark(value) -> None:
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            for dim in range(1, value.dim()):
                torch._dynamo.mark_static(value, dim)
        elif isinstance(value, (tuple, list)):
            for item in value:
                mark(item)

    def call(*args):
        mark(args)
        return compiled(*args)

    return call


def install(compile_fn: Optional[Callable], device_type: str = "cuda") -> None:
    """Run the codecs on `device_type`'s tensors through `compile_fn(fn)` (`compile_codec` on a GPU), or op by op
    everywhere (None)."""
    global _compile, _device_type
    if compile_fn is not _compile or device_type != _device_type:
        _compiled.clear()
    _compile, _device_type = compile_fn, device_type


def fused(device: torch.device) -> bool:
    return _compile is not None and device.type == _device_type


def kernel(fn: Callable, device: torch.device) -> Callable:
    """`fn` compiled (once per process) when compiled kernels are installed for `device`'s type, else `fn`."""
    if not fused(device):
        return fn
    compiled = _compiled.get(fn)
    if compiled is None:
        compiled = _compiled[fn] = _compile(fn)
    return compiled
