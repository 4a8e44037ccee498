"""Bad inputs, by class: each is one stderr line starting 'longtrain: error:', exit code 2, and nothing written
(the working directory's file tree is compared before and after). Checks that need files or the machine run on the
driver before Ray starts, so none of these starts Ray. In-process through `launch.cli.main` to stay fast; the
process-level cases (a real `longtrain` exit status, no traceback) run as subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main
from spec.config import load_job_config
from spec.resources import HARDWARE_PROFILES_DIR

CPU_PROFILE = (HARDWARE_PROFILES_DIR / "cpu.yaml").read_text()


def _files(root: Path) -> dict:
    """Every file and directory below root, with the files' sizes (what a command could have written)."""
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else "dir" for p in root.rglob("*")}


def _inputs(folder: Path) -> None:
    """The bad files the cases refer to, by name."""
    (folder / "list_section.yaml").write_text("model:\n  - 1\n  - 2\n")
    (folder / "scalar_section.yaml").write_text("train: 3\n")
    (folder / "not_a_mapping.yaml").write_text("- model\n- data\n")
    (folder / "binary.yaml").write_bytes(bytes(range(128, 256)) * 4)
    (folder / "nul.yaml").write_bytes(b"model:\n  num_layers: 2\x00\n")
    (folder / "duplicate.yaml").write_text("model:\n  num_layers: 2\n  hidden_size: 128\n  num_layers: 3\n")
    (folder / "duplicate_section.yaml").write_text("train:\n  max_steps: 5\ndata:\n  seq_len: 64\ntrain:\n  seed: 1\n")
    (folder / "hw_type.yaml").write_text(CPU_PROFILE.replace("devices_per_node: 2", "devices_per_node: [1, 2]"))
    (folder / "hw_text.yaml").write_text(CPU_PROFILE.replace("host_memory_gib:", "host_memory_gib: lots #"))
    (folder / "hw_broken.yaml").write_text("name: [cpu\n")
    (folder / "hw_list.yaml").write_text("- name\n")
    (folder / "plan_broken.yaml").write_text("format: longtrain-plan\nlayers: [\n")
    (folder / "plan_scalar.yaml").write_text("42\n")
    (folder / "a_file").write_text("not a directory\n")
    (folder / "odd_tokens.bin").write_bytes(b"\x01\x02\x03")
    (folder / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    (folder / "run_truncated").mkdir()
    (folder / "run_truncated" / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "rows": [{"ra')


BAD = {
    # config files and overrides
    "section as a list": (["train", "list_section.yaml"], "model is a section, not a list"),
    "section as a scalar": (["train", "scalar_section.yaml"], "train is a section, not a number"),
    "override of a section": (["train", "model=3"], "model is a section"),
    "config not a mapping": (["train", "not_a_mapping.yaml"], "must hold a mapping of sections"),
    "binary config": (["train", "binary.yaml"], "is not UTF-8 text"),
    "NUL byte in config": (["train", "nul.yaml"], "is not valid YAML"),
    "duplicate key": (["train", "duplicate.yaml"], "duplicate key 'num_layers' (first at line 2)"),
    "duplicate section": (["plan", "duplicate_section.yaml"], "duplicate key 'train' (first at line 1)"),
    "override not YAML": (["train", "train.deepspeed_extra={a:{b:1}}"], "write {key: value} with a space"),
    "glob in run.name": (["train", "run.name=exp*"], "run.name ('exp*') may hold only"),
    "bracket in run.name": (["train", "run.name=exp[1"], "run.name ('exp[1') may hold only"),
    "zero warm-up": (["train", "optim.warmup_steps=0"], "optim.warmup_steps (0) must be >= 1"),
    "negative memory snapshot": (["train", "metrics.memory_snapshot_steps=-1"],
                                 "metrics.memory_snapshot_steps (-1) must be >= 0"),
    "memory snapshot on CPU": (["train", "cluster.use_gpu=false", "metrics.memory_snapshot_steps=2"],
                               "metrics.memory_snapshot_steps (2) records the CUDA caching allocator"),
    "unknown allocator": (["train", "train.allocator=arena"], "train.allocator ('arena') must be one of caching, planned"),
    "planned allocator on CPU": (["train", "cluster.use_gpu=false", "train.allocator=planned"],
                                 "train.allocator=planned replaces the CUDA allocator and these workers run on CPU"),
    "unknown on_nonfinite": (["train", "train.on_nonfinite=maybe"], "train.on_nonfinite ('maybe') must be one of"),
    # hardware profiles
    "profile of wrong type": (["plan", "--profile", "hw_type.yaml"], "devices_per_node has a value of the wrong type"),
    "profile with text for a number": (["plan", "--profile", "hw_text.yaml"], "host_memory_gib has a value of the "
                                                                               "wrong type"),
    "broken profile YAML": (["plan", "--profile", "hw_broken.yaml"], "hw_broken.yaml is not valid YAML at line 2"),
    "profile not a mapping": (["plan", "--profile", "hw_list.yaml"], "must be a mapping"),
    "unknown profile (driver)": (["train", "metrics.hardware_profile=nope"], "hardware profile 'nope' not found"),
    # plans
    "broken plan YAML": (["train", "plan.path=plan_broken.yaml"], "plan_broken.yaml is not valid YAML at line 3"),
    "plan not a mapping": (["train", "plan.path=plan_scalar.yaml"], "holds a int, not a plan"),
    # where things are written
    "--out under a file": (["plan", "--profile", "cpu", "--out", "a_file/plan.yaml"], "a_file is a file"),
    "--out unwritable": (["plan", "--profile", "cpu", "--out", "/proc/longtrain/plan.yaml"], "cannot be written"),
    "--out a directory": (["plan", "--profile", "cpu", "--out", "."], "is a directory"),
    "run.root a file": (["train", "run.root=a_file"], "a_file is a file, not a directory"),
    "run.root unwritable": (["train", "run.root=/proc/longtrain"], "run.root (/proc/longtrain"),
    "run.dir a file": (["train", "run.dir=a_file"], "a_file) is a file, not a directory"),
    "run.dir under a file": (["train", "run.dir=a_file/run"], "a_file is a file, not a directory"),
    # checked on the driver before Ray starts
    "missing data.path": (["train", "data.source=tokens", "data.path=missing.bin"], "data.path (missing.bin) does "
                                                                                    "not exist"),
    "token file of a wrong size": (["train", "data.source=tokens", "data.path=odd_tokens.bin"], "not a multiple of 2"),
    "token file not an array": (["train", "data.source=tokens", "data.path=broken.npy"], "is not a readable .npy"),
    "GPUs this machine lacks": (["train", "cluster.use_gpu=true", "cluster.num_workers=64"], "needs 64 GPU(s) here"),
    "Ray Client address nothing answers on": (["train", "cluster.address=ray://127.0.0.1:1"],
                                              "no Ray Client server answers there"),
    "GCS address nothing answers on": (["train", "cluster.address=127.0.0.1:1"], "no Ray GCS answers there"),
    "deepspeed_extra with a bad value": (["train", "train.deepspeed_extra={zero_optimization: {stage: x}}"],
                                         "refused by DeepSpeed: DeepSpeedZeroConfig.stage"),
    "deepspeed_extra with an unknown key": (["train", "train.deepspeed_extra={zero_optimization: {bogus: 1}}"],
                                            "DeepSpeedZeroConfig.bogus: Extra inputs are not permitted"),
    "deepspeed_extra batch size": (["train", "train.deepspeed_extra={train_batch_size: 7}"],
                                   "train_batch_size is not equal to micro_batch_per_gpu"),
    "deepspeed_extra scheduler": (["train", "train.deepspeed_extra={scheduler: {params: {warmup_num_steps: 0}}}"],
                                  "warmup_num_steps must be a positive integer"),
    # runs
    "truncated metrics.jsonl": (["profile", "mfu", "run_truncated"], "holds no logged step yet"),
    # the command line
    "unknown flag": (["train", "--foo"], "unrecognized arguments: --foo"),
    "abbreviated flag": (["plan", "--profil", "cpu"], "unrecognized arguments: --profil"),
    "unknown command": (["trian"], "invalid choice: 'trian'"),
    "unknown profile command": (["profile", "mfux"], "invalid choice: 'mfux'"),
    "missing argument": (["status"], "the following arguments are required: job_id"),
}


@pytest.mark.parametrize("args,expected", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, expected, tmp_path, monkeypatch, capsys):
    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("longtrain: error: "), err
    assert expected in err, err
    assert _files(tmp_path) == before


@pytest.mark.parametrize("args,expected", [(["train", "binary.yaml"], "is not UTF-8 text"),
                                           (["train", "--profil"], "unrecognized arguments"),
                                           (["trian"], "invalid choice")], ids=["binary config", "flag", "command"])
def test_a_real_process_exits_2_with_one_line(args, expected, tmp_path):
    _inputs(tmp_path)
    before = _files(tmp_path)
    result = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and expected in result.stderr, result.stderr
    assert _files(tmp_path) == before


def test_an_empty_section_and_a_yaml_merge_key_are_fine(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("defaults: &d {num_layers: 2}\nmodel:\n  <<: *d\n  num_layers: 3\ndata:\n".replace("defaults",
                                                                                                     "x-defaults"))
    with pytest.raises(Exception, match="x-defaults"):  # an unknown top-level key is still refused by the schema
        load_job_config(str(path))
    path.write_text("model:\n  num_layers: 3\ndata:\ntrain:\n  max_steps: 70\n")
    job = load_job_config(str(path))
    assert job.model.num_layers == 3 and job.train.max_steps == 70


def test_the_writable_probe_leaves_nothing(tmp_path):
    from launch.paths import check_writable_dir, check_writable_file

    check_writable_dir(tmp_path / "new" / "deeper", "run.root")
    check_writable_file(tmp_path / "plans" / "x.plan.yaml", "--out")
    assert list(tmp_path.iterdir()) == []
    if os.geteuid() != 0:  # root writes anywhere a mode allows; a read-only directory stops anyone else
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(Exception, match="cannot be written"):
            check_writable_dir(tmp_path / "ro" / "runs", "run.root")
