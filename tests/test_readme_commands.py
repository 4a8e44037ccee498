"""The README's commands run as written: each command of its ```bash blocks that finishes on CPU in seconds is run
here (through the CLI's `main`, in a scratch folder that sees the repository's configs and profiles), with the
exit code and the figures the README states; every other command is listed with the reason it is not run here and
the test that covers it instead. A new README command fails the last test until it is sorted. About 15 s."""

import re
import shlex
from pathlib import Path

import pytest

from launch.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CALIBRATION_RUNS = ("h100_sxm_2026-11-26_bench-4l.json", "h100_sxm_2026-11-26_bench-4l-long.json",
                    "h100_sxm_2026-11-26_bench-4l-128k-overlap.json")

RUN = {
    "longtrain config show configs/default.yaml data.seq_len=512": (0, ["seq_len: 512", "max_steps: 400"]),
    "longtrain train --dry-run data.seq_len=512": (0, ["nothing started", '"train_micro_batch_size_per_gpu": 4']),
    "longtrain --version": (0, ["longtrain "]),
    "longtrain plan configs/llama7b4l_128k_1xh100.yaml": (0, ["plans/llama7b4l_128k_1xh100.plan.yaml"]),
    "longtrain plan configs/llama7b_1m_8xa800.yaml --out plans/memo.yaml": (0, ["plans/memo.yaml"]),
    # the README says it does not fit as written and names the change that does
    "longtrain plan model.preset=llama-7b data.seq_len=262144 data.micro_batch_size=8 cluster.num_workers=2 --profile h100_sxm":
        (2, ["data.micro_batch_size=1 train.grad_accum_steps=8"]),
    # the README's figures: step worst error 14.4% -> 5.5%, 4 then all 7 rows within 10%; peak 7.9% -> 6.5%
    "longtrain profile calibrate " + " ".join(f"profiles/runs/{name}" for name in CALIBRATION_RUNS):
        (0, ["| before | 14.4% | 4/7 | 7.9% | 6/7 |", "| after | 5.5% | 7/7 | 6.5% | 5/7 |"]),
}
"""README command -> (exit code, what its output holds)."""

COVERED_ELSEWHERE = {
    "python3 -m pip install": "installs; CI (.ci/run) runs the README's install and test command",
    "python3 -m pytest -q": "the test command itself: CI runs it (tests/test_readme.py keeps it equal to .ci/run)",
    "longtrain train": "the default job (minutes): tests/test_train_integration.py runs it and a resume",
    "longtrain train model.num_layers=2": "a training run (minutes); the default job: tests/test_train_integration.py",
    "longtrain train configs/default.yaml model.preset=llama-1b": "a 1B model at 8K on CPU: hours",
    "longtrain train resume=": "needs a run; resume forms: tests/test_checkpoint_files.py, tests/test_resume_*.py",
    "longtrain train model.init_from=": "needs downloaded Hugging Face or DeepSpeed weights; tests/test_hf_models.py",
    "longtrain train model.preset=llama-1b model.init_from=": "needs downloaded weights; tests/test_hf_models.py",
    "longtrain prepare-data": "needs a corpus and a tokenizer; tests/test_prepare_data.py",
    "longtrain train data.source=jsonl": "needs a corpus and a tokenizer; tests/test_prepare_data.py",
    "python3 docs/examples/make_tiny_hf_model.py": "a fine-tune walk-through (minutes): tests/test_hf_models.py",
    "python3 -c \"from transformers": "part of the fine-tune walk-through: tests/test_hf_export.py",
    "longtrain export runs/tiny-llama-ft": "part of the fine-tune walk-through: tests/test_hf_export.py",
    "longtrain bench": "measures a GPU",
    "longtrain profile hardware": "measures the machine (a GPU in this example); CPU: tests/test_profile_hardware.py",
    "longtrain eval": "needs a trained run or a downloaded model; tests/test_eval.py",
    "longtrain submit": "needs a Ray cluster: tests/test_jobs.py",
    "longtrain status": "needs a Ray cluster: tests/test_jobs.py",
    "longtrain logs": "needs a Ray cluster: tests/test_jobs.py",
    "longtrain stop": "needs a Ray cluster: tests/test_jobs.py",
    "longtrain jobs": "needs a Ray cluster: tests/test_jobs.py",
}
"""Command prefix -> why it is not run here and what covers it (the longest matching prefix applies)."""


def readme_commands():
    """Every command of the README's ```bash blocks: continuation lines joined, `&&` chains split, comments off."""
    commands = []
    for block in re.findall(r"```bash\n(.+?)\n```", README, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            commands += [part.strip() for part in line.split(" && ") if part.strip()]
    return commands


def _reason(command: str):
    if command in RUN:
        return "run"
    matches = [prefix for prefix in COVERED_ELSEWHERE if command == prefix or command.startswith(prefix + " ")
               or (prefix.endswith(("=", '"')) and command.startswith(prefix))]
    return COVERED_ELSEWHERE[max(matches, key=len)] if matches else None


def test_every_readme_command_is_run_here_or_covered_elsewhere():
    unsorted = [command for command in readme_commands() if _reason(command) is None]
    assert not unsorted, f"README commands neither run by this test nor listed with their coverage: {unsorted}"
    missing = [command for command in RUN if command not in readme_commands()]
    assert not missing, f"commands this test runs that the README no longer has: {missing}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder with the repository's configs and the calibration example's bench runs (output goes here)."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "configs").symlink_to(ROOT / "configs")
    (folder / "profiles" / "runs").mkdir(parents=True)
    for name in CALIBRATION_RUNS:
        (folder / "profiles" / "runs" / name).symlink_to(ROOT / "profiles" / "runs" / name)
    return folder


@pytest.mark.parametrize("command", sorted(RUN))
def test_readme_command_runs_as_written(command, scratch, monkeypatch, capsys):
    monkeypatch.chdir(scratch)
    try:
        code = main(shlex.split(command)[1:])
    except SystemExit as end:  # argparse's --version
        code = end.code
    out, err = capsys.readouterr()
    expected_code, holds = RUN[command]
    assert code == expected_code, out[-2000:] + err[-2000:]
    for text in holds:
        assert text in out + err, f"{command}: {text!r} not in its output:\n{(out + err)[-3000:]}"
