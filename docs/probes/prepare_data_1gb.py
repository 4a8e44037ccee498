"""Probe: `longtrain prepare-data` on a 1 GB JSONL file (issue 17): wall time, MB/s, and peak resident memory of the
whole process tree (the driver and its tokenizing processes, sampled every 50 ms with psutil) and of each process.

The file is made here from a corpus (random slices, log-normal lengths of mean about 4,000 characters, seeded):
`--corpus bible`, the bundled one (277 KB, 6,195 distinct words, so a trained vocabulary stops at about 6,500 ids
and every word is one cached merge), or `--corpus stdlib`, this Python's standard-library sources (31 MB of code and
English comments, a long tail of words, as real documents have). It is tokenized with a BPE trained here with
`tokenizers` on the same corpus (its template adds <s>, its config adds </s>): `--tokenizer bytelevel`, GPT-2's
byte-level pre-tokenizer; `--tokenizer llama3`, Llama-3's pre-tokenizer regex then byte-level mapping and
`ignore_merges`, as Llama-3's own tokenizer.json has (use --vocab 128256 for its size; trained once per directory,
kind, corpus and size); written to a fresh cache. `prepare-data` encodes with tiktoken where that is exact (its
summary line says which encoder ran).

    python docs/probes/prepare_data_1gb.py [--gigabytes 1] [--workers N] [--dir /tmp/prepare-1gb]
    python docs/probes/prepare_data_1gb.py --corpus stdlib --tokenizer llama3 --vocab 128256 --dir /tmp/prepare-1gb-llama3

Goal (issue 17): peak RSS under 2 GB; at least 30 MB/s on a 2-core machine. On a shared machine the wall time
depends on the other work; MB per CPU-second (driver and tokenizing processes together) does not.
"""

import argparse
import gzip
import json
import random
import resource
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from orchestrator.data import CORPUS_PATH  # noqa: E402


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama-3's pre-tokenizer split (its tokenizer.json's `Split` pattern)."""


def corpus_text(corpus: str) -> str:
    """The text documents are cut from: the bundled corpus, or this Python's standard-library sources."""
    if corpus == "bible":
        return gzip.open(CORPUS_PATH).read().decode()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in stdlib.rglob("*.py") if "site-packages" not in f.parts)
    return "\n".join(f.read_text(errors="replace") for f in files)


def make_jsonl(path: Path, gigabytes: float, seed: int, corpus: str = "bible") -> int:
    text = corpus_text(corpus)
    rng = random.Random(seed)
    target, written = int(gigabytes * 1e9), 0
    with open(path, "w") as out:
        while written < target:
            length = min(int(rng.lognormvariate(7.8, 0.9)), 60_000)
            start = rng.randrange(len(text) - length)
            line = json.dumps({"id": written, "text": text[start:start + length]}) + "\n"
            out.write(line)
            written += len(line.encode())
    return written


def make_tokenizer(directory: Path, vocab: int, kind: str = "bytelevel", corpus: str = "bible") -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind == "llama3":
        tokenizer = Tokenizer(models.BPE(ignore_merges=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus_text(corpus).split("\n\n"), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "add_eos_token": True}))


def run_measured(command: list) -> dict:
    """Run `command`, sampling the resident memory of it and its descendants every 50 ms; its CPU seconds (and its
    tokenizing processes', which it waits for) from the children's rusage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = psutil.Popen(command, cwd=REPO)
    peak_tree, peak_one = 0, 0
    while process.poll() is None:
        try:
            members = [process, *process.children(recursive=True)]
            sizes = [m.memory_info().rss for m in members]
        except psutil.Error:
            continue
        peak_tree, peak_one = max(peak_tree, sum(sizes)), max(peak_one, max(sizes))
        time.sleep(0.05)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": time.perf_counter() - started, "cpu_seconds": cpu, "returncode": process.returncode,
            "peak_tree_rss_mib": peak_tree / 2**20, "peak_process_rss_mib": peak_one / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dir", default="/tmp/prepare-1gb")
    parser.add_argument("--corpus", choices=("bible", "stdlib"), default="bible")
    parser.add_argument("--tokenizer", choices=("bytelevel", "llama3"), default="bytelevel")
    args = parser.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "documents.jsonl"
    if not source.is_file() or source.stat().st_size < args.gigabytes * 1e9:
        print(f"writing {source} ...", flush=True)
        make_jsonl(source, args.gigabytes, seed=0, corpus=args.corpus)
    tokenizer = directory / f"tokenizer-{args.tokenizer}-{args.corpus}-{args.vocab}"
    if not (tokenizer / "tokenizer.json").is_file():  # training 128,256 ids takes minutes: made once
        make_tokenizer(tokenizer, args.vocab, args.tokenizer, args.corpus)
    shutil.rmtree(directory / "cache", ignore_errors=True)
    command = [sys.executable, "-m", "launch.cli", "prepare-data", "data.source=jsonl", f"data.path={source}",
               f"data.tokenizer={tokenizer}", f"data.cache_dir={directory / 'cache'}",
               f"model.vocab_size={args.vocab}", "data.seq_len=8192",
               *(["--workers", str(args.workers)] if args.workers else [])]
    print("$ " + " ".join(command), flush=True)
    measured = run_measured(command)
    size = source.stat().st_size
    measured.update(bytes=size, mb_per_second=size / 1e6 / measured["seconds"], cpus=psutil.cpu_count(),
                    mb_per_cpu_second=size / 1e6 / measured["cpu_seconds"],
                    load_average_1min_after=psutil.getloadavg()[0])
    print(json.dumps(measured, indent=1))


if __name__ == "__main__":
    main()
