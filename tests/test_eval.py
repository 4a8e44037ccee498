"""`longtrain eval` (issue 22): perplexity by position equals a per-token loss computed directly from the model's
logits (ours, and transformers' for a Hugging Face directory); the passkey harness scores a predictor that reads the
passkey 100% and random or untrained models 0% (greedy chance is vocab^-digits); prompts have the asked length and
put the needle at the asked depth; the CLI writes the table, JSON and both PNGs for a run directory, RUN_DIR:TAG
(two checkpoints compared) and a Hugging Face directory; bad inputs are one line, exit 2, nothing written."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launch.cli import main
from orchestrator.checkpoint import manifest
from orchestrator.eval import perplexity
from orchestrator.eval.passkey import NEEDLE, Codec, make_prompt, min_length, model_scorer, run_grid
from orchestrator.eval.perplexity import bucket_edges, bucketed, token_losses
from orchestrator.eval.run import corpus_holdout_text
from orchestrator.model import LlamaModel
from spec.config import load_job_config
from spec.config.loader import job_to_yaml

SHAPE = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
         "model.intermediate_size=64", "data.seq_len=256"]
SMALL = ["eval.lengths=[256]", "eval.depths=[0,0.5,1]", "eval.trials=2", "eval.sequences=2", *SHAPE]


def tiny_model(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(load_job_config(None, SHAPE).model).eval()


def direct_losses(model: LlamaModel, window: torch.Tensor) -> torch.Tensor:
    logits = model(window[None, :-1])[0]
    return F.cross_entropy(logits, window[1:], reduction="none")


def test_bucket_edges_double_from_the_first():
    assert bucket_edges(256) == [0, 8, 16, 32, 64, 128, 256]
    assert bucket_edges(5000, 1024) == [0, 1024, 2048, 4096, 5000]
    assert bucket_edges(1 << 20) == [0] + [1 << k for k in range(15, 20)] + [1 << 20]
    assert bucket_edges(10) == [0, 1, 2, 4, 8, 10]


def test_bucketed_perplexity_equals_per_token_loss(monkeypatch):
    monkeypatch.setattr(perplexity, "LOSS_CHUNK", 100)  # three logit chunks per window, the last one short
    model = tiny_model()
    windows = [torch.randint(0, 256, (257,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    edges = bucket_edges(256)
    buckets = bucketed((token_losses(model, w) for w in windows), edges)
    with torch.no_grad():
        direct = torch.stack([direct_losses(model, w) for w in windows])  # [3, 256]
    for bucket, a, b in zip(buckets, edges, edges[1:]):
        assert (bucket.start, bucket.end, bucket.tokens) == (a, b, 3 * (b - a))
        assert bucket.loss == pytest.approx(float(direct[:, a:b].mean()), rel=1e-5)
    assert buckets[0].loss != pytest.approx(buckets[-1].loss, rel=1e-6)  # buckets differ: not one global mean


def test_prompts_have_the_length_and_the_needle_at_the_depth():
    codec, filler = Codec(None), np.frombuffer(b"filler text. " * 50, dtype=np.uint8).astype(np.int64)
    needle = codec.encode(NEEDLE.format(key="12345"))
    places = []
    for depth in (0.0, 0.5, 1.0):
        prompt = make_prompt(codec, filler, 300, depth, "12345", np.random.default_rng(0))
        assert len(prompt.tokens) == 300 and prompt.tokens[-prompt.answer:] == list(b"12345")
        assert prompt.tokens[prompt.needle_at:prompt.needle_at + len(needle)] == needle
        places.append(prompt.needle_at)
    budget = 300 - min_length(codec, 5)
    assert places[1] - places[0] == round(budget / 2) and places[2] - places[0] == budget
    assert min_length(codec, 5) < 256


def _oracle(inputs: torch.Tensor, last: int) -> torch.Tensor:
    """Reads the passkey after the needle's words: what a model that retrieves it perfectly predicts."""
    text = bytes(inputs.tolist())
    key = re.search(rb"The pass key is (\d+)\. Remember", text).group(1)
    return F.one_hot(torch.tensor(list(key[-last:])), 256).float()


def test_harness_scores_a_reader_all_and_guessers_none():
    codec, filler = Codec(None), np.frombuffer(b"The grass is green. " * 40, dtype=np.uint8).astype(np.int64)
    grid = dict(lengths=[256, 320], depths=[0.0, 0.3, 1.0], trials=4, digits=5, seed=1)
    assert all(cell.accuracy == 1.0 and cell.token_accuracy == 1.0 for cell in run_grid(_oracle, codec, filler, **grid))
    noise = torch.Generator().manual_seed(0)
    guessed = run_grid(lambda inputs, last: torch.randn(last, 256, generator=noise), codec, filler, **grid)
    assert all(cell.solved == 0 for cell in guessed)
    assert np.mean([c.token_accuracy for c in guessed]) < 0.05  # chance per token: 1/256
    fixed = run_grid(lambda inputs, last: F.one_hot(torch.tensor(list(b"55555"[-last:])), 256).float(), codec, filler,
                     **grid)  # always the same key: right only if the random key happens to be it
    assert sum(cell.solved for cell in fixed) == 0
    untrained = run_grid(model_scorer(tiny_model()), codec, filler, **{**grid, "lengths": [256], "trials": 2})
    assert all(cell.solved == 0 for cell in untrained)


def write_run(root: Path, models: dict, extra=()) -> Path:
    """A run directory as `longtrain train` leaves it with ZeRO-0 checkpoints (DeepSpeed's mp_rank_00 file and the
    COMPLETE marker with checksums) of the given models, {step: model}."""
    run = root / "tiny-20261201-120000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(job_to_yaml(load_job_config(None, [*SHAPE, *extra])))
    for step, model in models.items():
        tag = run / "checkpoints" / f"step_{step:08d}"
        tag.mkdir()
        torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
        (tag / "COMPLETE").write_text(json.dumps({"step": step, manifest.SUMS_KEY: manifest.collect(tag)}))
        (run / "checkpoints" / "latest").write_text(tag.name)
    return run


def test_cli_compares_two_checkpoints_of_a_run(tmp_path, capsys):
    run = write_run(tmp_path, {1: tiny_model(0), 2: tiny_model(1)})
    assert main(["eval", f"{run}:step_00000001", str(run), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "mean loss by position" in out and "passkey accuracy" in out and f"{run.name}:step_00000002" in out
    results = json.loads((run / "eval" / "results.json").read_text())
    assert [m["label"] for m in results["models"]] == [f"{run.name}:step_00000001", f"{run.name}:step_00000002"]
    for entry, seed in zip(results["models"], (0, 1)):
        assert len(entry["buckets"]) == 6 and len(entry["cells"]) == 3
        assert all(cell["accuracy"] == 0.0 for cell in entry["cells"])  # random weights: chance
        model, windows = tiny_model(seed), _holdout(2)
        with torch.no_grad():
            direct = torch.stack([direct_losses(model, w) for w in windows])
        assert entry["buckets"][-1]["loss"] == pytest.approx(float(direct[:, 128:].mean()), rel=1e-5)
    for png in ("perplexity.png", "passkey.png"):
        assert (run / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lengths_default_to_what_the_run_trained_at(tmp_path):
    run = write_run(tmp_path, {1: tiny_model()}, extra=["data.seq_len=320"])
    assert main(["eval", str(run), "eval.trials=1", "eval.depths=[0.5]", "eval.sequences=1"]) == 0
    entry = json.loads((run / "eval" / "results.json").read_text())["models"][0]
    assert entry["buckets"][-1]["end"] == 320 and [c["length"] for c in entry["cells"]] == [320]


def _holdout(count: int):
    from orchestrator.data import build_windows

    job = load_job_config(None, SHAPE)
    windows = build_windows(job.data, 256, job.train.seed)
    return [torch.from_numpy(windows.window(i, holdout=True)) for i in range(count)]


def test_cli_on_a_hugging_face_directory_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.test_hf_models import tiny

    hf = tiny.make_model(tmp_path / "hf", "llama", "none", tied=False)
    out = tmp_path / "out"
    assert main(["eval", str(hf), *SMALL, "eval.filler=repeated", "--out", str(out)]) == 0
    entry = json.loads((out / "results.json").read_text())["models"][0]
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    text = corpus_holdout_text(load_job_config(None, SHAPE))  # the corpus, encoded with the model's tokenizer
    ids = transformers.AutoTokenizer.from_pretrained(hf)(text, add_special_tokens=False)["input_ids"]
    windows = [torch.tensor(ids[i * 256:i * 256 + 257]) for i in range(2)]
    with torch.no_grad():
        direct = torch.stack([F.cross_entropy(reference(w[None, :-1]).logits[0], w[1:], reduction="none")
                              for w in windows])
    for bucket in entry["buckets"]:
        assert bucket["loss"] == pytest.approx(float(direct[:, bucket["start"]:bucket["end"]].mean()), rel=1e-4)


@pytest.mark.parametrize("case, args, words", [
    ("no checkpoints", ["{empty}"], "holds no complete checkpoint"),
    ("missing tag", ["{run}:step_00000009"], "does not exist"),
    ("not a model", ["{tmp}"], "not a longtrain run directory"),
    ("no such path", ["{tmp}/nope"], "does not exist"),
    ("beyond RoPE", ["{run}", "eval.lengths=[100000]"], "beyond what"),
    ("depth", ["{run}", "eval.depths=[0,1.5]"], "eval.depths"),
    ("too short", ["{run}", "eval.lengths=[50]"], "too short for the passkey prompt"),
    ("no model", ["eval.trials=2"], "no MODEL"),
])
def test_bad_inputs_are_one_line_exit_2_nothing_written(tmp_path, capsys, case, args, words):
    run = write_run(tmp_path, {1: tiny_model()})
    empty = tmp_path / "empty-20261201-120000"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    before = sorted(tmp_path.rglob("*"))
    argv = [a.format(run=run, empty=empty, tmp=tmp_path) for a in args]
    assert main(["eval", *argv, *SHAPE, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("longtrain: error:") and words in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_every_steps_needs_checkpoints_at_those_steps(capsys):
    assert main(["train", *SHAPE, "eval.every_steps=3", "checkpoint.every_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "eval.every_steps (3)" in err and "multiple of checkpoint.every_steps" in err
    with pytest.raises(Exception, match="beyond what the model covers"):
        load_job_config(None, [*SHAPE, "eval.every_steps=2", "checkpoint.every_steps=2", "eval.lengths=[1024]"])


@pytest.mark.slow
def test_eval_every_steps_adds_rows_during_training(tmp_path):
    """A real `longtrain train` (2 Ray workers, ZeRO-2): each checkpoint at a multiple of eval.every_steps gets a
    long_context_eval row in metrics.jsonl and a line in RUN_DIR/eval, equal to `longtrain eval RUN_DIR:TAG`."""
    import subprocess
    import sys

    args = [*SMALL, "train.max_steps=4", "optim.warmup_steps=1", "checkpoint.every_steps=2", "eval.every_steps=2",
            "train.log_every_steps=2", "data.micro_batch_size=2", "eval.trials=1"]
    result = subprocess.run([sys.executable, "-m", "launch.cli", "train", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("kind") == "long_context_eval"]
    assert [r["step"] for r in evals] == [2, 4] and result.stdout.count("passkey") >= 2
    saved = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert [m["label"] for m in saved] == [f"{run.name}:step_00000002", f"{run.name}:step_00000004"]
    assert (run / "eval" / "passkey.png").is_file() and (run / "eval" / "perplexity.png").is_file()
    assert main(["eval", f"{run}:step_00000002", *SMALL, "eval.trials=1", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())["models"][0]
    assert [b["loss"] for b in again["buckets"]] == pytest.approx([b["loss"] for b in evals[0]["buckets"]], rel=1e-6)
    assert evals[0]["buckets"] != evals[1]["buckets"]  # the weights changed between the checkpoints
