"""Probe: where `longtrain prepare-data`'s CPU time goes (issue 17), stage by stage, in one process, in CPU seconds
(the machine is shared, so wall time says little; each stage but ids and write is the least of --repeats runs, and
the encoding variants run batch after batch in turn, so they see the same interference from other work).

Stages, on a JSONL slice made like prepare_data_1gb.py's and the same tokenizers:
  read          the file's lines, as bytes
  parse         json.loads of each line and its text field
  pre-tokenize  encode_batch_fast with the tokenizer's own pre-tokenizer but a one-word WordLevel model: the
                pre-tokenizer (split, byte mapping) and the library's work per piece (its normalized strings with
                their alignments, the Encoding's tokens, offsets and masks); in parts, the same with only a
                whitespace split (the library's work per piece) and with only the pre-tokenizer's regex split
  BPE           encode_batch_fast with the real model, less the above: the merges (and their word cache)
  ids           each Encoding's ids into one numpy array per batch (what the part writer does)
  write         the ids to a file
With tiktoken exact for the tokenizer (launch/prepare/tiktoken_bpe.py), the encoding by tiktoken (ids as numpy
arrays) takes its turn with the variants. It also runs the pipeline's own `tokenize_task` over the slice in this
process with each encoder (the total the stages should add up to for `tokenizers`), the whole `longtrain prepare-data` command (driver and tokenizing processes: the driver adds a fixed few
seconds, importing torch for the packing table and drawing the histogram), and the library's own thread pool in
one process (TOKENIZERS_PARALLELISM=true: its CPU seconds against the same work on one thread).

    python docs/probes/prepare_data_profile.py [--megabytes 50] [--corpus bible|stdlib]
        [--tokenizer bytelevel|llama3] [--vocab 8192] [--dir /tmp/prepare-profile]
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ["TOKENIZERS_PARALLELISM"] = "false"
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from launch.prepare import encoders, pipeline, sources, tiktoken_bpe  # noqa: E402
from launch.prepare.tokenizer import TokenizerSpec  # noqa: E402
from prepare_data_1gb import LLAMA3_PATTERN, make_jsonl, make_tokenizer  # noqa: E402

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
"""The split of the byte-level pre-tokenizer (use_regex=True)."""


def cpu_seconds(run) -> float:
    started = time.process_time()  # every thread of this process
    run()
    return time.process_time() - started


def least(repeats: int, run) -> float:
    return min(cpu_seconds(run) for _ in range(repeats))


def batches(texts: list) -> list:
    """The texts cut as the pipeline cuts them (pipeline.BATCH_BYTES, pipeline.BATCH_DOCUMENTS)."""
    out, batch, size = [], [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= pipeline.BATCH_BYTES or len(batch) >= pipeline.BATCH_DOCUMENTS:
            out.append(batch)
            batch, size = [], 0
    return out + ([batch] if batch else [])


def encode_all(tokenizer, text_batches: list) -> int:
    return sum(len(e) for batch in text_batches
               for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=float, default=50)
    parser.add_argument("--corpus", choices=("bible", "stdlib"), default="bible")
    parser.add_argument("--tokenizer", choices=("bytelevel", "llama3"), default="bytelevel")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/prepare-profile")
    args = parser.parse_args()
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / f"{args.corpus}-{args.megabytes:g}mb.jsonl"
    if not source.is_file():
        make_jsonl(source, args.megabytes / 1e3, seed=0, corpus=args.corpus)
    tokenizer_dir = directory / f"{args.tokenizer}-{args.corpus}-{args.vocab}"
    make_tokenizer(tokenizer_dir, args.vocab, args.tokenizer, args.corpus)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    size = source.stat().st_size
    lines = source.read_bytes().splitlines(keepends=True)
    texts = [json.loads(line)["text"] for line in lines]
    text_batches = batches(texts)
    tokens = encode_all(tokenizer, text_batches)

    out_path = directory / "ids.bin"

    def ids_and_write() -> tuple:
        """CPU seconds of the ids (numpy per batch) and of writing them, batch by batch as the part writer goes."""
        ids = write = 0.0
        with open(out_path, "wb") as handle:
            for batch in text_batches:
                encodings = tokenizer.encode_batch_fast(batch, add_special_tokens=False)
                started = time.process_time()
                array = np.concatenate([np.asarray(e.ids, dtype=dtype) for e in encodings])
                ids += time.process_time() - started
                started = time.process_time()
                handle.write(array.tobytes())
                write += time.process_time() - started
        return ids, write

    def read():
        with open(source, "rb") as handle:
            for _ in handle:
                pass

    def one_word_model(pre_tokenizer=None):
        """The tokenizer's pipeline with a one-word WordLevel model: what remains is the pre-tokenizer's cost."""
        copy = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        copy.model = models.WordLevel({"<unk>": 0}, unk_token="<unk>")
        if pre_tokenizer is not None:
            copy.pre_tokenizer = pre_tokenizer
        return copy

    pattern = LLAMA3_PATTERN if args.tokenizer == "llama3" else GPT2_PATTERN

    def batch_fast(library_tokenizer):
        return lambda batch: library_tokenizer.encode_batch_fast(batch, add_special_tokens=False)

    variants = {"whitespace split": batch_fast(one_word_model(pre_tokenizers.WhitespaceSplit())),
                "regex split": batch_fast(one_word_model(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))),
                "pre-tokenize": batch_fast(one_word_model()), "encode": batch_fast(tokenizer)}
    tokenizer_json = str(tokenizer_dir / "tokenizer.json")
    problem = tiktoken_bpe.exactness_problem(tokenizer_json)
    if not problem:
        variants["tiktoken"] = encoders.TiktokenEncoder(tokenizer_json).encode_batch

    def in_turn() -> dict:
        """CPU seconds of each variant, batch after batch in turn, so that all see the same load from other work."""
        seconds = dict.fromkeys(variants, 0.0)
        for batch in text_batches:
            for name, variant in variants.items():
                seconds[name] += cpu_seconds(lambda: variant(batch))
        return seconds

    stages = {
        "read": least(args.repeats, read),
        "parse": least(args.repeats, lambda: [json.loads(line)["text"] for line in lines]),
    }
    rounds = [in_turn() for _ in range(args.repeats)]
    variant_seconds = {name: min(r[name] for r in rounds) for name in variants}
    stages["pre-tokenize"] = variant_seconds["pre-tokenize"]
    stages["BPE"] = max(variant_seconds["encode"] - variant_seconds["pre-tokenize"], 0.0)
    stages["ids"], stages["write"] = ids_and_write()

    parts = directory / "parts"
    parts.mkdir(exist_ok=True)
    tasks = sources.make_tasks("jsonl", [source])
    pipeline_cpu = {}
    for encoder in ("tokenizers",) if problem else ("tokenizers", "tiktoken"):
        spec = TokenizerSpec(tokenizer_json, None, vocab, (0,), (1,), ("<s>",), ("</s>",), encoder)
        pipeline._start_worker(spec, "jsonl", "text", str(parts))
        pipeline_cpu[encoder] = least(args.repeats, lambda: [pipeline.tokenize_task(task) for task in tasks])

    cache = directory / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "launch.cli", "prepare-data", "data.source=jsonl", f"data.path={source}",
               f"data.tokenizer={tokenizer_dir}", f"data.cache_dir={cache}", f"model.vocab_size={vocab}",
               "data.seq_len=8192"]
    before, wall = children_cpu(), time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    command_cpu, command_wall = children_cpu() - before, time.perf_counter() - wall

    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # last: no process is forked after the library's threads start
    wall = time.perf_counter()
    threaded_cpu = cpu_seconds(lambda: encode_all(tokenizer, text_batches))
    threaded_wall = time.perf_counter() - wall

    total = sum(stages.values())
    print(f"{source.name}: {size / 1e6:.1f} MB, {len(texts):,} documents, {tokens:,} tokens "
          f"({size / tokens:.2f} bytes a token); tokenizer {args.tokenizer}, {vocab:,} ids; least of "
          f"{args.repeats}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'stage':30s} {'CPU s':>7s} {'share':>6s} {'MB per CPU-s':>13s}")
    for name in ("read", "parse", "pre-tokenize", "BPE", "ids", "write"):
        print(f"{name:30s} {stages[name]:7.2f} {stages[name] / total:6.1%} {size / 1e6 / stages[name]:13.1f}")
    print("pre-tokenize, in parts (a one-word model after: the library's own work per piece, the split, the rest):")
    for name in ("whitespace split", "regex split", "pre-tokenize"):
        print(f"  {name:28s} {variant_seconds[name]:7.2f} {'':6s} {size / 1e6 / variant_seconds[name]:13.1f}")
    print(f"{'sum of the stages':30s} {total:7.2f} {'':6s} {size / 1e6 / total:13.1f}")
    if "tiktoken" in variant_seconds:
        seconds = variant_seconds["tiktoken"]
        print(f"{'encode with tiktoken':30s} {seconds:7.2f} {'':6s} {size / 1e6 / seconds:13.1f}  (ids as numpy)")
    else:
        print(f"tiktoken not exact for this tokenizer: {problem}")
    for encoder, seconds in pipeline_cpu.items():
        print(f"{'tokenize_task, ' + encoder:30s} {seconds:7.2f} {'':6s} {size / 1e6 / seconds:13.1f}")
    print(f"{'encode, library threads':30s} {threaded_cpu:7.2f} {'':6s} {size / 1e6 / threaded_cpu:13.1f}"
          f"  (wall {threaded_wall:.2f} s on {os.cpu_count()} CPUs)")
    print(f"{'longtrain prepare-data':30s} {command_cpu:7.2f} {'':6s} {size / 1e6 / command_cpu:13.1f}"
          f"  (wall {command_wall:.2f} s; driver and tokenizing processes)")
    print(json.dumps({"source_bytes": size, "documents": len(texts), "tokens": tokens, "vocab": vocab,
                      "stages_cpu_s": stages, "variants_cpu_s": variant_seconds, "pipeline_cpu_s": pipeline_cpu, "threaded_cpu_s": threaded_cpu,
                      "threaded_wall_s": threaded_wall, "command_cpu_s": command_cpu,
                      "command_wall_s": command_wall}))


if __name__ == "__main__":
    main()
