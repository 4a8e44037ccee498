"""No code runs from a checkpoint without consent: a crafted DeepSpeed checkpoint whose model-states file would
create a file when unpickled is refused in one line, through `resume=` and through `model.init_from=`, before
anything is written, and the file is not created; `checkpoint.trust_pickles=true` is the way to load it."""

import os
from pathlib import Path

import pytest
import torch

from launch.cli import main
from orchestrator.checkpoint import load_file
from spec.errors import CheckpointError


class CreatesAFile:
    """Unpickling this runs open(path, "w"): what an attacker's checkpoint would do with a shell command."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted_checkpoint(root: Path, marker: Path) -> Path:
    """A plain DeepSpeed checkpoint directory (`latest` + a tag) whose model states carry the payload."""
    tag_dir = root / "crafted" / "global_step1"
    tag_dir.mkdir(parents=True)
    states = {"module": {"embed.weight": torch.zeros(2, 2)}, "dp_world_size": 1, "trainer": CreatesAFile(marker)}
    torch.save(states, tag_dir / "mp_rank_00_model_states.pt")
    (root / "crafted" / "latest").write_text("global_step1")
    return root / "crafted"


@pytest.mark.parametrize("key", ["resume", "model.init_from"])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys, key):
    marker = tmp_path / "created-by-unpickling"
    checkpoint = _crafted_checkpoint(tmp_path, marker)
    states = checkpoint / "global_step1" / "mp_rank_00_model_states.pt"
    code = main(["train", f"run.root={tmp_path / 'runs'}", f"{key}={checkpoint}"])
    err = capsys.readouterr().err.strip()
    print(err)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"checkpoint file {states} holds Python objects of type io.open" in err
    assert "set checkpoint.trust_pickles=true" in err
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_trust_pickles_is_the_consent_that_loads_it(tmp_path):
    marker = tmp_path / "created-by-unpickling"
    states = _crafted_checkpoint(tmp_path, marker) / "global_step1" / "mp_rank_00_model_states.pt"
    with pytest.raises(CheckpointError, match="trust_pickles"):
        load_file(states, trust=False)
    assert not marker.exists()
    load_file(states, trust=True)
    assert marker.exists()


def test_deepspeed_optimizer_classes_load_without_a_full_unpickle(tmp_path):
    """What DeepSpeed's ZeRO optimizer states hold besides tensors (its loss scaler, ZeRO stage, fragment
    addresses) is on the allowlist, as the real classes in a worker and as inert stand-ins on the driver."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from orchestrator.checkpoint.pickles import check_files

    state = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2),
                                      "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]}}
    tag_dir = tmp_path / "global_step1"
    tag_dir.mkdir()
    torch.save(state, tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_files(tag_dir, trust=False)
    loaded = load_file(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", trust=False)["optimizer_state_dict"]
    assert isinstance(loaded["loss_scaler"], LossScaler) and loaded["zero_stage"] == ZeroStageEnum(2)
    assert os.listdir(tmp_path) == ["global_step1"]
