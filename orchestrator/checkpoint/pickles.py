"""Checkpoint files are read without running their code, unless the user trusts their source.

Why: torch.save files are Python pickles, and a full unpickle of a crafted one runs any command it names: on the
driver, which reads a checkpoint's metadata before the workers start, and in every worker. DeepSpeed reads its own
files with `weights_only=False` (its TorchCheckpointEngine, `zero_to_fp32`, `ds_to_universal`), so longtrain reads
every `.pt` file of a checkpoint first with torch's `weights_only=True` unpickler, which builds tensors, containers
and primitives only, plus an allowlist of the few classes DeepSpeed's and longtrain's files hold (DeepSpeed's loss
scaler, ZeRO stage and fragment address; numpy arrays in longtrain's rank files before format 2). The driver checks
a checkpoint's files this way before anything else reads them (with `mmap`, so the tensor bytes are not read), and
a worker's DeepSpeed engine loads through the same unpickler (`safe_loads`). Anything else is refused in one line
that names the file and `checkpoint.trust_pickles=true`, the flag that allows a full unpickle for a trusted source.
"""

import importlib
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple, Union

import numpy as np
import torch

from spec.errors import CheckpointError

TRUST_FLAG = "checkpoint.trust_pickles=true"
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""Classes DeepSpeed 0.19's checkpoint files hold (its optimizer states); nothing else but tensors and containers."""


def _numpy_globals() -> List[Any]:
    """numpy arrays, as longtrain's rank files held RNG states before format 2 (`np.random.get_state()`)."""
    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class _Inert:
    """Stands in for a DeepSpeed class on the driver, which checks files without importing DeepSpeed: built and
    filled like the real one by the restricted unpickler, it can do nothing else."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def allowed_globals(real: bool) -> List[Union[Callable, Tuple[Callable, str]]]:
    """The allowlist: DeepSpeed's own classes (real: imported; else inert stand-ins under their names) and numpy."""
    if real:
        deepspeed = [getattr(importlib.import_module(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1])
                     for name in DEEPSPEED_GLOBALS]
    else:
        deepspeed = [(_Inert, name) for name in DEEPSPEED_GLOBALS]
    return deepspeed + _numpy_globals()


def load_file(path: Path, trust: bool, map_location: Any = "cpu", mmap: bool = False, real: bool = True) -> Any:
    """torch.load without running code: the restricted unpickler and the allowlist; a file that needs more is
    refused in one line, or with `trust` unpickled in full."""
    try:
        with torch.serialization.safe_globals(allowed_globals(real)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if not trust:
            raise CheckpointError(refusal(path, error)) from error
    return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)


def refusal(path: Path, error: Exception) -> str:
    found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(error))
    what = f"Python objects of type {found.group(1)}" if found else "Python objects"
    return (f"checkpoint file {path} holds {what}, which are neither tensors nor DeepSpeed's own; loading it could "
            f"run code, so longtrain refuses it: if you trust where it came from, set {TRUST_FLAG}")


def check_files(tag_dir: Path, trust: bool) -> None:
    """Every torch file of a checkpoint tag passes the restricted unpickler (driver side: nothing is imported,
    tensor bytes are mapped, not read). With `trust` there is nothing to check."""
    if trust:
        return
    for file in sorted(Path(tag_dir).glob("*.pt")):
        load_file(file, trust=False, mmap=True, real=False)


class _SafeLoads:
    """A DeepSpeed checkpoint engine whose `load` goes through `load_file`; everything else is the wrapped one's."""

    def __init__(self, inner, trust: bool):
        self._inner, self._trust = inner, trust

    def load(self, path, map_location=None):
        return load_file(Path(path), self._trust, map_location=map_location)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextmanager
def safe_loads(engine, trust: bool) -> Iterator[None]:
    """While inside, `engine.load_checkpoint` reads every file (model states, ZeRO shards) through `load_file`:
    DeepSpeed's engine reads all of them with `self.checkpoint_engine.load`."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _SafeLoads(inner, trust)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
