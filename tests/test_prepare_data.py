"""`longtrain prepare-data`: the token file and offsets equal a direct tokenization (JSONL over parallel processes and
byte-range tasks, Parquet row groups, text files read in pieces), BOS/EOS as the tokenizer's config says, the cache
reused and invalidated by a changed file, every bad input one line with exit code 2, and a packed documents run
through the trainer's step on real DeepSpeed engines (sp=2 on gloo equals sp=1). The tokenizer is a real byte-level
BPE trained with `tokenizers` on the bundled corpus."""

import gzip
import json
import random

import numpy as np
import pytest

from launch.cli import main
from launch.prepare import sources
from launch.prepare_command import ensure_prepared
from orchestrator.process_group import init_process_group
from orchestrator.data import CORPUS_PATH
from spec.config import load_job_config
from spec.prepared import OFFSETS_FILE, SUMMARY_FILE, TOKENS_FILE
from tests.conftest import spawn_gloo

VOCAB = 512


@pytest.fixture(scope="module")
def corpus():
    return gzip.open(CORPUS_PATH).read().decode()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus):
    """A byte-level BPE whose template adds <s> (as Llama's does) and whose config adds </s> (add_eos_token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus.split("\n\n"), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"},
                                                                 "add_eos_token": True}))
    return directory


def _texts(corpus, count, seed):
    rng = random.Random(seed)
    return [corpus[start:start + int(rng.lognormvariate(5, 1))] for start in
            (rng.randrange(len(corpus) - 3000) for _ in range(count))]


def _write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: text, "n": i}) + "\n" for i, text in enumerate(texts)))
    return path


def _direct(tokenizer_dir, texts):
    """What a plain `tokenizers` call gives each document (its template adds <s>), plus </s> from the config."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return [tokenizer.encode(text).ids + [tokenizer.token_to_id("</s>")] for text in texts if text]


def _job(tmp_path, tokenizer_dir, source, path, *more):
    return load_job_config(None, [f"data.source={source}", f"data.path={path}", f"data.tokenizer={tokenizer_dir}",
                                  f"data.cache_dir={tmp_path / 'cache'}", f"model.vocab_size={VOCAB}",
                                  "data.seq_len=256", *more])


def _prepared_documents(directory):
    summary = json.loads((directory / SUMMARY_FILE).read_text())
    tokens = np.fromfile(directory / TOKENS_FILE, dtype=summary["token_dtype"])
    offsets = np.load(directory / OFFSETS_FILE)
    return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def test_jsonl_over_processes_and_byte_ranges_equals_a_direct_tokenization(tmp_path, tokenizer_dir, corpus,
                                                                          monkeypatch):
    (tmp_path / "docs").mkdir()
    first, second = _texts(corpus, 60, 1), _texts(corpus, 40, 2)
    first[7] = ""  # an empty document is skipped
    _write_jsonl(tmp_path / "docs" / "a.jsonl", first)
    _write_jsonl(tmp_path / "docs" / "b.jsonl", second)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)  # many tasks per file; lines cross task boundaries
    prepared = ensure_prepared(_job(tmp_path, tokenizer_dir, "jsonl", tmp_path / "docs"), workers=2)
    assert prepared.created and prepared.summary["workers"] == 2 and prepared.summary["empty_documents_skipped"] == 1
    assert prepared.summary["encoder"] == "tiktoken"  # exact for this byte-level BPE (tests/test_tiktoken_bpe.py)
    assert _prepared_documents(prepared.directory) == _direct(tokenizer_dir, first + second)


def test_parquet_row_groups_and_text_pieces_equal_a_direct_tokenization(tmp_path, tokenizer_dir, corpus,
                                                                      monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _texts(corpus, 30, 3)
    pq.write_table(pa.table({"body": texts, "n": list(range(30))}), tmp_path / "docs.parquet", row_group_size=7)
    prepared = ensure_prepared(_job(tmp_path, tokenizer_dir, "parquet", tmp_path / "docs.parquet",
                                    "data.text_field=body"), workers=2)
    assert _prepared_documents(prepared.directory) == _direct(tokenizer_dir, texts)

    (tmp_path / "books").mkdir()
    books = [corpus[:20_000], corpus[50_000:53_000]]
    for i, book in enumerate(books):
        (tmp_path / "books" / f"{i}.txt").write_text(book)
    monkeypatch.setattr(sources, "TEXT_PIECE_BYTES", 1000)  # the first book is read in about 20 pieces
    prepared = ensure_prepared(_job(tmp_path, tokenizer_dir, "text", tmp_path / "books"), workers=1)
    assert _prepared_documents(prepared.directory) == _direct(tokenizer_dir, books)

    normalized = tmp_path / "normalized"  # a normalizer: not a tiktoken shape, so `tokenizers` encodes
    normalized.mkdir()
    config = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    (normalized / "tokenizer.json").write_text(json.dumps(dict(config, normalizer={"type": "NFC"})))
    (normalized / "tokenizer_config.json").write_text((tokenizer_dir / "tokenizer_config.json").read_text())
    prepared = ensure_prepared(_job(tmp_path, normalized, "text", tmp_path / "books"), workers=1)
    assert prepared.summary["encoder"] == "tokenizers"
    assert _prepared_documents(prepared.directory) == _direct(normalized, books)


def test_the_cache_is_reused_and_a_changed_file_makes_a_new_one(tmp_path, tokenizer_dir, corpus, capsys):
    path = _write_jsonl(tmp_path / "a.jsonl", _texts(corpus, 20, 4))
    job = _job(tmp_path, tokenizer_dir, "jsonl", path)
    first = ensure_prepared(job, workers=1)
    again = ensure_prepared(_job(tmp_path, tokenizer_dir, "jsonl", path), workers=1)
    assert first.created and not again.created and again.directory == first.directory
    assert job.data.prepared == str(first.directory)
    _write_jsonl(path, _texts(corpus, 20, 5))
    changed = ensure_prepared(_job(tmp_path, tokenizer_dir, "jsonl", path), workers=1)
    assert changed.created and changed.directory != first.directory
    assert main(["prepare-data", "data.source=jsonl", f"data.path={path}", f"data.tokenizer={tokenizer_dir}",
                 f"data.cache_dir={tmp_path / 'cache'}", f"model.vocab_size={VOCAB}", "data.seq_len=256"]) == 0
    out = capsys.readouterr().out
    assert f"prepared   {changed.directory}  (reused" in out
    for word in ("documents  20 ", "tokens ", "lengths    min", "histogram", "sequences ", "holdout"):
        assert word in out, word
    assert (changed.directory / "lengths.png").stat().st_size > 1000


def _bad_inputs(tmp_path, tokenizer_dir, corpus):
    good = _texts(corpus, 30, 6)
    _write_jsonl(tmp_path / "good.jsonl", good)
    (tmp_path / "empty.jsonl").write_text("")
    lines = [json.dumps({"text": t}) for t in good]
    lines[22] = '{"text": "unterminated'
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
    paired = [json.dumps({"text": t}) for t in good]  # json.dumps escapes the emoji as a valid surrogate pair
    paired[4] = json.dumps({"text": "half of a pair \ud83d alone, then \U0001f600 whole"})
    (tmp_path / "surrogate.jsonl").write_text("\n".join(paired) + "\n")
    _write_jsonl(tmp_path / "field.jsonl", good, field="content")
    return {
        "missing file": ([f"data.path={tmp_path / 'nope.jsonl'}"], "does not exist"),
        "empty file": ([f"data.path={tmp_path / 'empty.jsonl'}"], "is empty"),
        "malformed line": ([f"data.path={tmp_path / 'broken.jsonl'}"], "broken.jsonl:23: malformed JSON"),
        "malformed line, 2 processes": ([f"data.path={tmp_path / 'broken.jsonl'}", "--workers", "2"],
                                        "broken.jsonl:23: malformed JSON"),
        "missing field": ([f"data.path={tmp_path / 'field.jsonl'}"], "field.jsonl:1: no 'text' field"),
        "lone surrogate": ([f"data.path={tmp_path / 'surrogate.jsonl'}"],
                           "surrogate.jsonl:5: field 'text' holds a lone surrogate (\\ud83d"),
        "tokenizer vocabulary": ([f"data.path={tmp_path / 'good.jsonl'}", "model.vocab_size=256"],
                                 f"has {VOCAB} ids, more than model.vocab_size (256)"),
        "missing tokenizer": ([f"data.path={tmp_path / 'good.jsonl'}", f"data.tokenizer={tmp_path}"],
                              "no tokenizer at"),
    }


@pytest.mark.parametrize("case", ["missing file", "empty file", "malformed line", "malformed line, 2 processes",
                                  "missing field", "lone surrogate", "tokenizer vocabulary", "missing tokenizer"])
def test_every_bad_input_is_one_line_and_exit_code_2(case, tmp_path, tokenizer_dir, corpus, capsys, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 2048)
    extra, expected = _bad_inputs(tmp_path, tokenizer_dir, corpus)[case]
    code = main(["prepare-data", "data.source=jsonl", f"data.tokenizer={tokenizer_dir}", f"model.vocab_size={VOCAB}",
                 f"data.cache_dir={tmp_path / 'cache'}", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and expected in err, err
    assert not [p for p in (tmp_path / "cache").glob("*") if p.is_dir()]  # nothing half-prepared is left


def _steps(rank, world, put, job):
    """Two optimizer steps of real DeepSpeed engines through the trainer's step on packed documents."""
    import deepspeed
    import torch

    from orchestrator import sequence_parallel
    from orchestrator.data import RankSampler, build_windows
    from orchestrator.ds_config import deepspeed_config
    from orchestrator.metrics import StepMeter
    from orchestrator.model import LlamaModel
    from orchestrator.trainer import _train_step

    init_process_group(use_cuda=False)
    dims = job.parallel_dims()
    group = sequence_parallel.sequence_groups(dims)
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    if group is not None:
        sequence_parallel.install(model, group, split_layers=set())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(job, False))
    sampler = RankSampler(build_windows(job.data, job.model.vocab_size, 0), job.data.micro_batch_size,
                          dims.sampler_rank(rank), dims.dp_degree, 0)
    meter = StepMeter(job.model, job.data.seq_len, 1.0, rank, "node0")
    losses = []
    for _ in range(2):
        losses.append(_train_step(engine, sampler, 1, meter, group))
        reading = meter.stop(len(losses), losses[-1], 0.0, dims.tokens_per_step_per_rank)
    put({"rank": rank, "losses": losses, "tflops": reading.tflops, "full": reading.mfu_full_attention})


def test_packed_documents_train_the_same_with_sp2_on_gloo(tmp_path, tokenizer_dir, corpus):
    path = _write_jsonl(tmp_path / "a.jsonl", _texts(corpus, 80, 7))
    common = ["model.num_layers=2", "data.micro_batch_size=2", "optim.warmup_steps=1", "data.seq_len=256"]
    runs = {}
    for sp in (1, 2):
        job = _job(tmp_path, tokenizer_dir, "jsonl", path, *common, f"cluster.num_workers={sp}",
                   f"parallel.sp_degree={sp}")
        ensure_prepared(job, workers=1)
        runs[sp] = sorted(spawn_gloo(_steps, sp, job), key=lambda r: r["rank"])
    single, split = runs[1][0]["losses"], runs[2][0]["losses"]
    assert split[0] == pytest.approx(single[0], rel=1e-5) and split[1] == pytest.approx(single[1], rel=1e-5)
    assert runs[2][0]["losses"] == runs[2][1]["losses"]  # step 2 equal too: the updates (gradients) were
    assert runs[1][0]["tflops"] > 0 and runs[1][0]["full"] > 0
