"""Hugging Face models in: `model.init_from=HF_DIR` takes the shape and RoPE from config.json, and longtrain's model
then computes what transformers computes (logits, loss and every gradient, fp32) for LlamaForCausalLM,
MistralForCausalLM and Qwen2ForCausalLM, each RoPE type (none, linear, llama3, yarn) at positions beyond 100K, tied
and untied. What longtrain would compute differently, and a key that contradicts config.json, is one line, exit 2,
nothing written. transformers is the reference (a test dependency), never in the training path."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from spec.config import load_job_config

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("make_tiny_hf_model", ROOT / "docs" / "examples" / "make_tiny_hf_model.py")
tiny = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tiny)

SHAPE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=512)
FAR = 150_000
"""Positions beyond 100K: where a wrong frequency shows most."""


def make(directory: Path, architecture="llama", rope="none", tied=True) -> Path:
    return tiny.make_model(directory, architecture, rope, tied, **SHAPE)


def ours(directory: Path, *overrides):
    from orchestrator.checkpoint import load_init_from
    from orchestrator.model import LlamaModel

    job = load_job_config(None, [f"model.init_from={directory}", *overrides])
    model = LlamaModel(job.model)
    load_init_from(model, job.model.init_from)
    return model


def reference(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")


def tokens() -> torch.Tensor:
    return torch.randint(0, tiny.VOCAB_SIZE, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("hf") / "llama", rope="llama3")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("rope", ["none", "linear", "llama3", "yarn"])
@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
def test_logits_loss_and_gradients_equal_transformers(tmp_path, architecture, rope, tied):
    from orchestrator.checkpoint.weights import longtrain_name

    directory = make(tmp_path / "hf", architecture, rope, tied)
    theirs, mine, ids = reference(directory), ours(directory), tokens()
    for start in (0, FAR):
        positions = torch.arange(start, start + ids.shape[1])
        expected = theirs(input_ids=ids, position_ids=positions.expand(2, -1)).logits
        torch.testing.assert_close(mine(ids, positions=positions), expected, rtol=1e-4, atol=1e-5)
    if rope != "none":  # the scaling is what makes them equal: plain RoPE on the same weights is far off
        plain = ours(directory, "model.rope_scaling.type=none")(ids, positions=positions)
        assert (plain - expected).abs().max() > 1e-3  # 100 x the tolerance
    loss = theirs(input_ids=ids, position_ids=positions.expand(2, -1), labels=ids).loss
    loss.backward()
    my_loss = mine(ids[:, :-1], targets=ids[:, 1:], positions=positions[:-1])
    my_loss.backward()
    torch.testing.assert_close(my_loss, loss, rtol=1e-5, atol=1e-6)
    my_grads = {name: p.grad for name, p in mine.named_parameters()}
    their_grads = {longtrain_name(name): p.grad for name, p in theirs.named_parameters()}
    assert set(my_grads) == set(their_grads)
    for name, grad in their_grads.items():
        torch.testing.assert_close(my_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_config_json_fills_the_shape(llama):
    job = load_job_config(None, [f"model.init_from={llama}"])
    m = job.model
    assert (m.preset, m.architecture, m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads,
            m.intermediate_size, m.rope_theta, m.norm_eps, m.tie_embeddings, m.max_position_embeddings) == \
        ("hf", "llama", tiny.VOCAB_SIZE, 64, 2, 4, 2, 96, 500000.0, 1e-5, True, 512)
    assert (m.rope_scaling.type, m.rope_scaling.factor, m.rope_scaling.original_max_position_embeddings,
            m.rope_scaling.low_freq_factor, m.rope_scaling.high_freq_factor) == ("llama3", 8.0, 256, 1.0, 4.0)


def test_transformers_4_config_json_is_read_as_transformers_reads_it(tmp_path):
    """rope_theta and rope_scaling ({"type": ...}) instead of rope_parameters, as published Llama 2/3 configs are."""
    directory = make(tmp_path / "hf", rope="linear")
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=250000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (directory / "config.json").write_text(json.dumps(config))
    job = load_job_config(None, [f"model.init_from={directory}"])
    assert (job.model.rope_theta, job.model.rope_scaling.type, job.model.rope_scaling.factor) == (250000.0, "linear",
                                                                                                   2.0)
    ids, positions = tokens(), torch.arange(FAR, FAR + 48)
    expected = reference(directory)(input_ids=ids, position_ids=positions.expand(2, -1)).logits
    torch.testing.assert_close(ours(directory)(ids, positions=positions), expected, rtol=1e-4, atol=1e-5)


def test_context_extension_is_a_config_change_stated_in_the_header(llama):
    from launch.train_command import _header

    job = load_job_config(None, [f"model.init_from={llama}", "model.rope_theta=2000000",
                                 "model.max_position_embeddings=2048"])
    assert job.model.rope_theta == 2e6 and job.model.num_layers == 2
    header = _header(job, Path("/tmp/run"), False)
    assert f"model LlamaForCausalLM from {llama}" in header
    assert ("context extension: rope_theta 500000 -> 2e+06, max_position_embeddings 512 -> 2048 "
            f"(from {llama}/config.json)") in header
    yarn = load_job_config(None, [f"model.init_from={llama}", "model.rope_scaling.type=yarn",
                                  "model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=512"])
    assert "rope_scaling llama3 x8 from 256 -> yarn x4 from 512" in _header(yarn, Path("/tmp/run"), False)
    plain = load_job_config(None, [f"model.init_from={llama}"])
    assert "context extension" not in _header(plain, Path("/tmp/run"), False)


@pytest.mark.parametrize("architecture,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def test_parameter_count_counts_the_biases(tmp_path, architecture, tied):
    from orchestrator.model import count_parameters
    from spec.flops import parameter_count

    directory = make(tmp_path / "hf", architecture, tied=tied)
    job = load_job_config(None, [f"model.init_from={directory}"])
    expected = reference(directory).num_parameters()
    assert parameter_count(job.model) == count_parameters(ours(directory)) == expected


def _edited(source: Path, tmp_path: Path, **changes) -> Path:
    directory = tmp_path / "edited"
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _refused(tmp_path, capsys, *args) -> str:
    """`longtrain train ...` is one line on stderr, exit 2, and nothing is written."""
    from launch.cli import main

    root = tmp_path / "runs"
    code = main(["train", *args, f"run.root={root}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("longtrain: error: ") and err.count("\n") == 1, err
    assert not root.exists()
    return err


@pytest.mark.parametrize("changes,words", [
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     ["model.rope_scaling.type=dynamic is refused", "inference trick"]),
    (dict(architectures=["GemmaForCausalLM"]), ["architectures ['GemmaForCausalLM']", "LlamaForCausalLM"]),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096),
     ["sliding_window=4096", "whole sequence"]),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True), ["use_sliding_window"]),
    (dict(attention_bias=True), ["attention_bias=true"]),
    (dict(hidden_act="gelu"), ["hidden_act='gelu'"]),
    (dict(head_dim=64), ["head_dim=64"]),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), ["RoPE type 'longrope'"]),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "mscale": 0.7, "rope_theta": 1e4}), ["mscale"]),
    (dict(num_hidden_layers=None), ["num_hidden_layers"]),
])
def test_config_json_that_longtrain_would_compute_differently_is_one_line(llama, tmp_path, capsys, changes, words):
    err = _refused(tmp_path, capsys, f"model.init_from={_edited(llama, tmp_path, **changes)}")
    for word in words:
        assert word in err


@pytest.mark.parametrize("args,words", [
    (["model.num_layers=4"], ["model.num_layers=4 (on the command line)", "num_hidden_layers=2",
                              "remove model.num_layers"]),
    (["model.tie_embeddings=false"], ["model.tie_embeddings=False", "tie_word_embeddings=True"]),
    (["model.architecture=qwen2"], ["model.architecture=qwen2", "architectures=LlamaForCausalLM"]),
    (["model.preset=llama-7b"], ["model.preset=llama-7b (on the command line) sets model.vocab_size=32000",
                                 f"vocab_size={tiny.VOCAB_SIZE}", "remove model.preset"]),
    (["model.rope_scaling.type=dynamic"], ["model.rope_scaling.type=dynamic is refused"]),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.original_max_position_embeddings=null"],
     ["original_max_position_embeddings is required for yarn"]),
])
def test_a_key_that_contradicts_config_json_is_one_line(llama, tmp_path, capsys, args, words):
    err = _refused(tmp_path, capsys, f"model.init_from={llama}", *args)
    for word in words:
        assert word in err


def test_a_config_file_that_contradicts_config_json_names_the_file(llama, tmp_path, capsys):
    job_file = tmp_path / "job.yaml"
    job_file.write_text("model:\n  hidden_size: 128\n")
    err = _refused(tmp_path, capsys, str(job_file), f"model.init_from={llama}")
    assert f"model.hidden_size=128 (in config file {job_file}) contradicts {llama}/config.json: hidden_size=64" in err


def test_broken_config_json_and_preset_hf_without_one_are_one_line(llama, tmp_path, capsys):
    broken = _edited(llama, tmp_path)
    (broken / "config.json").write_text("{not json")
    assert "is not valid JSON" in _refused(tmp_path, capsys, f"model.init_from={broken}")
    assert "model.preset=hf takes the shape from model.init_from's config.json" in _refused(
        tmp_path, capsys, "model.preset=hf")


def test_a_matching_preset_and_matching_keys_are_accepted(tmp_path):
    directory = make(tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config.update(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=352, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    (directory / "config.json").write_text(json.dumps(config))  # the debug preset's shape (weights not read here)
    job = load_job_config(None, ["model.preset=debug", "model.num_layers=4", f"model.init_from={directory}"])
    assert (job.model.preset, job.model.hidden_size, job.model.norm_eps) == ("debug", 128, 1e-5)


def test_transformers_is_a_test_dependency_only():
    """No package of longtrain imports transformers: it is the reference here, not part of training or export."""
    import ast

    found = [str(path.relative_to(ROOT)) for package in ("spec", "planner", "orchestrator", "launch")
             for path in (ROOT / package).rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, (ast.Import, ast.ImportFrom))
             and any((name or "").split(".")[0] == "transformers"
                     for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]))]
    assert not found, found
