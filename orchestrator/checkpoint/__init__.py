"""Checkpoints and resume in one place: writing and loading them in the workers, checking them on the driver.

- `manager`: atomic DeepSpeed checkpoints with per-rank RNG and data position; `CheckpointRef` and `resume_source`
  (what a worker loads).
- `inspect`: a checkpoint's files, writer and shapes read without starting a worker; `resolve_tag` for DIR[:TAG].
- `pickles`: every checkpoint file read by torch's restricted unpickler (no code runs) unless the user trusts it.
- `manifest`: sha256 of every file of a tag, in its COMPLETE marker, verified before a resume.
- `weights`: Hugging Face / safetensors / DeepSpeed weights renamed onto our model and shape-checked.
- `init_from`: `model.init_from`, the weights a fresh run starts from.
- `universal`: DeepSpeed universal conversion when the data-parallel size changed.
- `resume`: the driver's decisions: what `resume=` names, whether it fits the job, where the workers start.
"""

from orchestrator.checkpoint.init_from import check_init_from, load_init_from, model_shapes
from orchestrator.checkpoint.inspect import CheckpointInfo, check_torch_file, inspect_checkpoint, resolve_tag
from orchestrator.checkpoint.manager import (COMPLETE_MARKER, TAG_PREFIX, CheckpointManager, CheckpointRef,
                                             complete_tags, latest_complete_tag, resume_source, tag_for_step)
from orchestrator.checkpoint.pickles import TRUST_FLAG, load_file
from orchestrator.checkpoint.resume import (check_resume, check_same_model, continued_run, foreign_checkpoint,
                                            foreign_checkpoint_warning, prepare_resume, verify_checksums)
from orchestrator.checkpoint.universal import UNIVERSAL_DIR, convert_to_universal, needs_universal
from orchestrator.checkpoint.weights import check_shapes, load_weights

__all__ = [
    "COMPLETE_MARKER", "TAG_PREFIX", "TRUST_FLAG", "UNIVERSAL_DIR", "CheckpointInfo", "CheckpointManager",
    "CheckpointRef", "check_init_from", "check_resume", "check_same_model", "check_shapes", "check_torch_file",
    "complete_tags", "continued_run", "convert_to_universal", "foreign_checkpoint", "foreign_checkpoint_warning",
    "inspect_checkpoint", "latest_complete_tag", "load_file", "load_init_from", "load_weights", "model_shapes",
    "needs_universal", "prepare_resume", "resolve_tag", "resume_source", "tag_for_step", "verify_checksums",
]
