"""Block-score predictors: trained on a frozen model, saved, loaded by the token_elim section and used to choose
the kept blocks; held-out top-k recall is measured against the exact scores."""


import pytest
import torch

from launch.cli import main
from spec.config import load_job_config
from orchestrator.data import build_windows
from spec.errors import ConfigError
from orchestrator.memory import apply_plan, token_elim
from orchestrator.memory.token_elim_predictors import held_out_recall, load_predictors, train_predictors
from orchestrator.model import LlamaModel, rope_tables

OVERRIDES = ["data.seq_len=512", "data.micro_batch_size=2", "token_elim.keep_ratio=0.5",
             "token_elim.dense_first_layers=1"]


def _model(job):
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    for name, param in model.named_parameters():  # larger weights than at init: attention with some structure
        if not name.endswith("norm.weight"):
            torch.nn.init.normal_(param, std=0.08)
    return model


class _Exact(torch.nn.Module):
    """A 'predictor' that returns the exact scores: recall must be 1."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def scores(self, normed):
        cos, sin = rope_tables(torch.arange(normed.shape[1]), self.layer.attn.head_dim, 10000.0,
                                          normed.dtype)
        return token_elim.block_informativeness(*token_elim.rotated_query_key(self.layer, normed, cos, sin), 64)


def test_trained_predictors_are_saved_loaded_and_choose_the_kept_blocks(tmp_path):
    job = load_job_config(None, OVERRIDES)
    model, windows = _model(job), build_windows(job.data, job.model.vocab_size, job.train.seed)
    report = train_predictors(job, model, windows, steps=20, out=tmp_path / "p.pt")
    print(f"\nheld-out top-k recall after 20 steps: {report.recall} (last blocks: {report.last_blocks_recall}), "
          f"final loss {report.final_loss}")
    assert set(report.recall) == {1, 2} and all(0 <= r <= 1 for r in report.recall.values())
    for layer, recall in report.recall.items():  # chance is 0.5 (4 of 8 blocks); the position prior is worse here
        assert recall > max(0.6, report.last_blocks_recall[layer]), (report.recall, report.last_blocks_recall)
    exact = {i: _Exact(model.layers[i]) for i in (1, 2)}
    assert held_out_recall(model, exact, windows, job.token_elim, 4)[0] == {1: 1.0, 2: 1.0}

    sparse_job = load_job_config(None, OVERRIDES + ["token_elim.enabled=true", f"token_elim.predictors={report.path}"])
    apply_plan(model, None, sparse_job.compression, sparse_job.token_elim, sparse_job.train)
    tokens = torch.from_numpy(windows.window(0, holdout=True)[:-1])[None]
    with torch.no_grad():
        model(tokens)
        normed = model.layers[0](model.embed(tokens), *_tables(model, tokens.shape[1]))
        expected = model.layers[1].token_elim.predictor.scores(model.layers[1].attn_norm(normed)).topk(4).indices
    kept_blocks = model.layers[1].token_elim.last_kept[0, ::64] // 64
    assert kept_blocks.tolist() == sorted(expected[0].tolist())


def _tables(model, seq):
    return rope_tables(torch.arange(seq), model.config.head_dim, model.config.rope_theta, torch.float32)


def test_predictors_of_another_shape_are_refused_in_one_line(tmp_path):
    job = load_job_config(None, OVERRIDES)
    path = tmp_path / "p.pt"
    train_predictors(job, _model(job), build_windows(job.data, 256, 0), steps=1, out=path, holdout_sequences=1)
    other = load_job_config(None, OVERRIDES + ["model.num_layers=6"]).model
    with pytest.raises(ConfigError, match="retrain it with longtrain train-predictors"):
        load_predictors(str(path), other, 64)
    with pytest.raises(ConfigError, match="does not exist"):
        load_predictors(str(tmp_path / "missing.pt"), other, 64)


def test_train_predictors_command_writes_the_file_and_reports_recall(tmp_path, capsys):
    out = tmp_path / "predictors.pt"
    assert main(["train-predictors", *OVERRIDES, "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "recall" in printed and f"token_elim.predictors={out}" in printed
    assert set(torch.load(out, weights_only=True)["layers"]) == {1, 2}


def test_train_refuses_a_missing_predictors_file_before_starting_workers(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert main(["train", "token_elim.enabled=true", f"token_elim.predictors={missing}",
                 f"run.root={tmp_path / 'runs'}"]) == 2
    assert f"token_elim.predictors ({missing}) does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
