"""Hugging Face models out: a Hugging Face model -> `longtrain train` -> `longtrain export` -> transformers loads the
directory and computes the logits longtrain computes from the same checkpoint, for ZeRO-3 (2 workers, consolidated by
DeepSpeed's zero_to_fp32) and ZeRO-0 (1 worker). The ZeRO-3 run starts from a Llama with llama3 RoPE scaling and
extends it (model.rope_theta): the header states it and the export carries it, with the source's tokenizer. The
ZeRO-0 run (the trainer without Ray, and the config.yaml the driver would write) is a Qwen2 (q/k/v biases, untied)
from random weights: its config.json is written from the job. Bad inputs are one line, exit 2, nothing written.

Runs are 3 steps: with optim.warmup_steps=1, DeepSpeed's WarmupCosineLR gives steps 1 and 2 a learning rate of 0, so
2 steps would export the weights as loaded."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spec.config import job_to_yaml, load_job_config
from tests.conftest import train_without_ray
from tests.test_hf_models import FAR, tiny

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
BASE = ["train.max_steps=3", "optim.warmup_steps=1", "train.log_every_steps=1", "checkpoint.every_steps=0",
        "data.seq_len=128", "data.micro_batch_size=2"]
TAG = "step_00000003"


def _train(cwd: Path, *args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launch.cli", "train", *BASE, *args], cwd=cwd,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_export")
    llama = tiny.make_model(root / "llama", "llama", "llama3", tied=True)
    zero3 = _train(root, f"model.init_from={llama}", "model.rope_theta=2000000", "train.zero_stage=3",
                   "cluster.num_workers=2", f"run.dir={root / 'zero3'}")
    qwen2 = [*BASE, "model.architecture=qwen2", "model.tie_embeddings=false", "train.zero_stage=0"]
    train_without_ray(root / "zero0", 1, qwen2)  # the trainer alone: the run above covers `longtrain train`
    (root / "zero0" / "config.yaml").write_text(job_to_yaml(load_job_config(None, ["cluster.num_workers=1", *qwen2])))
    return {"root": root, "llama": llama, "zero3_stdout": zero3.stdout}


def export(*args) -> int:
    from launch.cli import main

    return main(["export", *map(str, args)])


def longtrain_model(run: Path):
    from orchestrator.checkpoint import load_init_from
    from orchestrator.checkpoint.export import run_model
    from orchestrator.model import LlamaModel

    model = LlamaModel(run_model(run)[0])
    load_init_from(model, f"{run}/checkpoints:{TAG}")
    return model


def assert_same_logits(hf_dir: Path, run: Path, atol: float = 1e-5) -> torch.Tensor:
    """transformers' logits of the exported directory equal longtrain's of the run's checkpoint (positions 0 and
    beyond 100K); returns transformers' logits at 0."""
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    ours = longtrain_model(run)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for start in (FAR, 0):
            positions = torch.arange(start, start + ids.shape[1])
            expected = theirs(input_ids=ids, position_ids=positions.expand(2, -1)).logits
            torch.testing.assert_close(ours(ids, positions=positions), expected, rtol=1e-4, atol=atol)
    return expected


def test_the_run_header_states_the_context_extension(runs):
    assert f"model LlamaForCausalLM from {runs['llama']}" in runs["zero3_stdout"]
    assert ("context extension: rope_theta 500000 -> 2e+06 (from " in runs["zero3_stdout"])


def test_zero3_export_loads_in_transformers_with_longtrains_logits(runs, tmp_path, capsys):
    out = tmp_path / "zero3_hf"
    assert export(runs["root"] / "zero3", out, "--dtype", "fp32") == 0
    printed = capsys.readouterr().out
    assert "(ZeRO-3, 2 rank(s))" in printed and "tokenizer.json" in printed
    logits = assert_same_logits(out, runs["root"] / "zero3")
    source = transformers.AutoModelForCausalLM.from_pretrained(runs["llama"])
    with torch.no_grad():  # trained: not the weights it started from
        assert (source(torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))).logits
                - logits).abs().max() > 1e-3
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["rope_theta"], config["rope_scaling"]["rope_type"],
            config["rope_scaling"]["original_max_position_embeddings"], config["tie_word_embeddings"],
            config["torch_dtype"], config["bos_token_id"]) == (["LlamaForCausalLM"], 2e6, "llama3", 256, True,
                                                                 "float32", 257)
    assert config["max_position_embeddings"] >= 128
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (runs["llama"] / name).read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    with safe_open(str(runs["llama"] / "model.safetensors"), "pt") as handle:
        assert set(index["weight_map"]) == set(handle.keys())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}


def test_zero0_qwen2_from_random_weights_exports_from_the_job(runs, tmp_path):
    out = tmp_path / "zero0_hf"
    assert export(runs["root"] / "zero0", out, "--dtype", "fp32") == 0
    assert_same_logits(out, runs["root"] / "zero0")
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["hidden_size"], config["num_hidden_layers"], config["tie_word_embeddings"],
            config["max_position_embeddings"]) == (["Qwen2ForCausalLM"], 128, 4, False, 128)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.0.self_attn.q_proj.bias" in index["weight_map"] and "lm_head.weight" in index["weight_map"]
    assert not (out / "tokenizer.json").exists()
    assert json.loads((out / "generation_config.json").read_text()) == {"_from_model_config": True}


def test_bf16_export_is_the_fp32_weights_rounded(runs, tmp_path):
    from safetensors.torch import load_file

    assert export(runs["root"] / "zero3", tmp_path / "bf16") == 0
    assert export(runs["root"] / "zero3", tmp_path / "fp32", "--dtype", "fp32") == 0
    rounded = load_file(str(tmp_path / "bf16" / "model-00001-of-00001.safetensors"))
    full = load_file(str(tmp_path / "fp32" / "model-00001-of-00001.safetensors"))
    assert rounded.keys() == full.keys()
    for name, tensor in rounded.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, full[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_shards_of_a_given_size_load_in_transformers(runs, tmp_path):
    from orchestrator.checkpoint.export import export_run

    result = export_run(str(runs["root"] / "zero3"), str(tmp_path / "sharded"), "fp32", max_shard_bytes=300_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert result.shards == len(files) > 3
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert all(p.stat().st_size <= 300_000 + 10_000 for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert_same_logits(tmp_path / "sharded", runs["root"] / "zero3")


def _refused(capsys, *args) -> str:
    code = export(*args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("longtrain: error: ") and err.count("\n") == 1, err
    return err


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def test_existing_out_dir_is_refused_unless_overwrite_and_then_only_a_model_directory(runs, tmp_path, capsys):
    out = tmp_path / "model"
    assert export(runs["root"] / "zero0", out) == 0
    before = _tree(out)
    assert "exists; pass --overwrite" in _refused(capsys, runs["root"] / "zero0", out)
    assert _tree(out) == before
    assert export(runs["root"] / "zero0", out, "--overwrite") == 0
    assert _tree(out) != before and (out / "config.json").is_file()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert "is not a model directory" in _refused(capsys, runs["root"] / "zero0", other, "--overwrite")
    assert (other / "keep.txt").read_text() == "mine"
    assert "which the export reads" in _refused(capsys, runs["root"] / "zero0", runs["root"] / "zero0", "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "notes"]  # no temporary directory left


def test_bad_sources_are_one_line_and_nothing_is_written(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert "is not a longtrain run directory" in _refused(capsys, tmp_path, out)
    assert f"{TAG[:-1]}9 does not exist; complete tags there: {TAG}" in _refused(
        capsys, f"{runs['root'] / 'zero0'}:{TAG[:-1]}9", out)
    copy = tmp_path / "copy"
    shutil.copytree(runs["root"] / "zero0", copy)
    shutil.copytree(copy / "checkpoints" / TAG, copy / "checkpoints" / "step_00000004")
    (copy / "checkpoints" / "step_00000004" / "COMPLETE").unlink()
    assert "step_00000004 is incomplete" in _refused(capsys, f"{copy}:step_00000004", out)
    states = copy / "checkpoints" / TAG / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    assert "mp_rank_00_model_states.pt does not match the checksum" in _refused(capsys, copy, out)
    (copy / "checkpoints" / TAG / "COMPLETE").unlink()
    assert "holds no complete checkpoint" in _refused(capsys, copy, out)
    assert "argument --dtype: invalid choice: 'fp16'" in _refused(capsys, runs["root"] / "zero0", out, "--dtype",
                                                                   "fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
