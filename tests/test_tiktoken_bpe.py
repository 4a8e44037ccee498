"""tiktoken built from a byte-level BPE tokenizer.json (`launch/prepare/tiktoken_bpe.py`) gives exactly the ids the
`tokenizers` library gives wherever `exactness_problem` allows it: BPEs trained with `tokenizers` (GPT-2's, Llama
3's and Qwen2's pre-tokenizers), random BPEs trained by random choices and random tiktoken-style BPEs converted
as `transformers` converts Llama 3's, on text with unicode, emoji, CJK, whitespace runs, newlines, digits,
contractions and added tokens, and every code point in contexts that show how each regex engine classifies it.
It refuses the shapes and merge lists where the two differ, and the driver's check of a run's first documents
falls back to `tokenizers` with one note when they differ (a wrong regex planted)."""

import gzip
import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer

from launch.prepare import encoders, sources, tiktoken_bpe
from launch.prepare.tokenizer import TokenizerSpec
from orchestrator.data import CORPUS_PATH

CHAR_OF = {byte: char for char, byte in tiktoken_bpe.byte_of_char().items()}
SPECIAL = ["Hello 世界! I'm here; you'RE THERE'S it's 'ſ '\u212a ’s don't",
           "12345 678901 3.14159 ٣٤٥ ½ Ⅻ 2026-12-01",
           "tabs\t\there  and   runs     of spaces  \n\n\n\r\n  \u00a0\u3000\u2028 nbsp", "\n", "   ", "\t\n \t",
           "😀👍🏽 👨‍👩‍👧‍👦 🇩🇪 emoji", "日本語の文章です。中文字符，标点。한국어 텍스트", "naïve café e\u0301 ﬁ Å ǅ",
           "مرحبا بالعالم हिन्दी ไทย ქართული", "<s>inside</s> a <s> b</s>c <s", "a" * 3000, " " * 2000 + "x",
           "x" + "\n" * 50 + "y", "", "ends with space ", "'''''", "<|x|>"]
"""Unicode, emoji (a ZWJ family, a skin tone, a flag), CJK, combining marks, whitespace runs and kinds, newlines,
digits, contractions (case folded: 'ſ, 'K with the Kelvin sign), added tokens inside text, long runs."""


@pytest.fixture(scope="module")
def corpus():
    return gzip.open(CORPUS_PATH).read().decode()


@pytest.fixture(scope="module")
def texts(corpus):
    rng = random.Random(0)
    pieces = [corpus[start:start + int(rng.lognormvariate(6, 1))]
              for start in (rng.randrange(len(corpus) - 5000) for _ in range(150))]
    return pieces + SPECIAL + [" ".join(SPECIAL)]


def _pre_tokenizer(pattern: str) -> dict:
    if pattern == "gpt2":
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": tiktoken_bpe.KNOWN_PATTERNS[pattern]}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _write(path, vocab, merges, pattern="llama3", ignore_merges=True, added=()):
    config = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
              "added_tokens": [{"id": id_, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": True} for c, id_ in added],
              "pre_tokenizer": _pre_tokenizer(pattern), "post_processor": None, "decoder": None,
              "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                        "ignore_merges": ignore_merges, "vocab": vocab, "merges": [list(m) for m in merges]}}
    path.write_text(json.dumps(config))
    return str(path)


def _trained(directory, pattern, corpus, vocab=1500):
    """A BPE trained by `tokenizers` with the pattern's pre-tokenizer, <s> and </s> added tokens."""
    from tokenizers import Regex, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(ignore_merges=pattern != "gpt2"))
    tokenizer.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if pattern == "gpt2" else
                               pre_tokenizers.Sequence([
                                   pre_tokenizers.Split(Regex(tiktoken_bpe.KNOWN_PATTERNS[pattern]), "isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    tokenizer.train_from_iterator(corpus.split("\n\n") + SPECIAL * 20, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = directory / f"{pattern}.json"
    tokenizer.save(str(path))
    return str(path)


def _ids_both_ways(path, texts):
    reference = [e.ids for e in Tokenizer.from_file(path).encode_batch_fast(texts, add_special_tokens=False)]
    fast = [ids.tolist() for ids in encoders.TiktokenEncoder(path).encode_batch(texts)]
    return reference, fast


def _first_difference(reference, fast, texts):
    return next(((texts[i][:60], reference[i][:12], fast[i][:12]) for i in range(len(texts))
                 if reference[i] != fast[i]), None)


@pytest.mark.parametrize("pattern", ["gpt2", "llama3", "qwen2"])
def test_bpe_trained_by_tokenizers_gives_the_same_ids(pattern, tmp_path, corpus, texts):
    path = _trained(tmp_path, pattern, corpus)
    assert tiktoken_bpe.exactness_problem(path) == ""
    reference, fast = _ids_both_ways(path, texts)
    assert _first_difference(reference, fast, texts) is None
    assert any(0 in ids for ids in reference)  # the added token <s> inside a text is matched both ways


def _random_trained(rng, words, merges_wanted):
    """BPE training with random choices: each merge joins a random adjacent pair of the words as segmented so far."""
    vocab = {CHAR_OF[b]: b for b in range(256)}
    merges = []
    state = [[CHAR_OF[b] for b in word.encode()] for word in words]
    for _ in range(merges_wanted):
        pairs = sorted({p for word in state for p in zip(word, word[1:]) if p[0] + p[1] not in vocab})
        if not pairs:
            break
        left, right = rng.choice(pairs)
        vocab[left + right] = len(vocab)
        merges.append((left, right))
        for word in state:
            i = 0
            while i < len(word) - 1:
                if word[i] == left and word[i + 1] == right:
                    word[i:i + 2] = [left + right]
                i += 1
    return vocab, merges


def _random_converted(rng, words, steps):
    """A tiktoken-style BPE (any two parts forming a token merge; rank = id) grown by random choices, converted
    to merges as `transformers` converts Llama 3's: every split of a token into two tokens, by token rank."""
    vocab = {CHAR_OF[b]: b for b in range(256)}
    for _ in range(steps):
        word = rng.choice(words).encode()
        ranks = {bytes(tiktoken_bpe.byte_of_char()[c] for c in token): id_ for token, id_ in vocab.items()}
        parts = tiktoken_bpe._tiktoken_merges(word, ranks)
        if len(parts) > 1:
            i = rng.randrange(len(parts) - 1)
            by_id = {id_: token for token, id_ in vocab.items()}
            vocab.setdefault(by_id[parts[i]] + by_id[parts[i + 1]], len(vocab))
    merges = []
    for token, rank in vocab.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges += [(rank, vocab[a], vocab[b], a, b) for a, b in splits]
    return vocab, [(a, b) for *_, a, b in sorted(merges)]


def _random_merges(rng, merges_wanted):
    """Random pairs of tokens merged in random order: mostly not what BPE training makes."""
    vocab = {CHAR_OF[b]: b for b in range(256)}
    merges = []
    letters = [CHAR_OF[b] for b in b"abs '"]
    while len(merges) < merges_wanted:
        pool = letters + [token for token in vocab if len(token) > 1]
        left, right = rng.choice(pool), rng.choice(pool)
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    return vocab, merges


def test_random_bpes_give_the_same_ids_wherever_allowed(tmp_path):
    """Random BPEs of three kinds on text from a small alphabet (many overlapping merges): trained and converted
    ones are allowed and give the same ids; random merge lists are mostly refused, and the few allowed give the
    same ids too."""
    rng = random.Random(0)
    alphabet = "ab ab ab ab's'S\n\t01é世😀"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 80))) for _ in range(1500)]
    words = ["".join(rng.choice("ab 's") for _ in range(rng.randrange(2, 14))) for _ in range(300)]
    outcomes = {"trained": [], "converted": [], "random": []}
    for trial in range(24):
        kind = ("trained", "converted", "random")[trial % 3]
        vocab, merges = (_random_trained(rng, words + texts[:40], 150) if kind == "trained" else
                         _random_converted(rng, words, 400) if kind == "converted" else _random_merges(rng, 120))
        pattern = ("gpt2", "llama3", "qwen2")[rng.randrange(3)]
        path = _write(tmp_path / f"{trial}.json", vocab, merges, pattern, ignore_merges=rng.random() < 0.5)
        problem = tiktoken_bpe.exactness_problem(path)
        outcomes[kind].append(problem)
        if not problem:
            reference, fast = _ids_both_ways(path, texts)
            assert _first_difference(reference, fast, texts) is None, (kind, pattern, merges)
    assert outcomes["trained"] == [""] * 8 and outcomes["converted"] == [""] * 8
    assert sum(bool(problem) for problem in outcomes["random"]) >= 6


def test_refused_where_the_ids_would_differ(tmp_path):
    """'the' from (t, he) while (t, h) ranks first: `tokenizers` stops at [th][e], tiktoken joins them (a pair
    that is no merge); merge order against ids; shapes tiktoken does not reproduce."""
    vocab = {CHAR_OF[b]: b for b in range(256)}
    for token in ("th", "he", "the"):
        vocab[token] = len(vocab)
    path = _write(tmp_path / "the.json", vocab, [("t", "h"), ("h", "e"), ("t", "he")], "gpt2", ignore_merges=False)
    assert "'the'" in tiktoken_bpe.exactness_problem(path)
    reference, fast = _ids_both_ways(path, ["the", "bathe"])
    assert reference != fast  # the refusal is about a real difference

    path = _write(tmp_path / "order.json", vocab, [("h", "e"), ("t", "h"), ("t", "he")], "gpt2")
    assert "merge order and ids disagree" in tiktoken_bpe.exactness_problem(path)

    good = _write(tmp_path / "good.json", vocab, [("t", "h"), ("h", "e"), ("th", "e")], "gpt2")
    assert tiktoken_bpe.exactness_problem(good) == ""
    config = json.loads(open(good).read())
    for change, why in [(("normalizer", {"type": "NFC"}), "normalizer"),
                        (("pre_tokenizer", dict(config["pre_tokenizer"], add_prefix_space=True)), "pre-tokenizer"),
                        (("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
                            {"type": "Split", "pattern": {"Regex": r"\w+"}, "behavior": "Isolated", "invert": False},
                            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}), "Split regex"),
                        (("model", dict(config["model"], byte_fallback=True)), "byte_fallback"),
                        (("model", dict(config["model"], continuing_subword_prefix="##")), "continuing_subword")]:
        changed = tmp_path / f"{why}.json"
        changed.write_text(json.dumps(dict(config, **{change[0]: change[1]})))
        assert why in tiktoken_bpe.exactness_problem(str(changed))
    nested = _write(tmp_path / "nested.json", vocab, [("t", "h")], "gpt2", added=[("<a>", 300), ("<a>b", 301)])
    assert "prefix of another" in tiktoken_bpe.exactness_problem(nested)


@pytest.mark.parametrize("pattern", ["gpt2", "llama3", "qwen2"])
def test_every_code_point_is_split_alike(pattern, tmp_path):
    """Each code point c between letters, digits, an apostrophe, a space and a newline; a BPE whose only merges
    join those characters to a byte, so the ids show where each regex engine (Oniguruma in `tokenizers`,
    fancy-regex in tiktoken) cut: letters, digits, whitespace, case folding ('S, 'ſ). Plane 0 whole, planes 1
    and 14 every 4th code point (a script added in a newer Unicode is a block), planes 2 and 3 every 32nd."""
    vocab = {CHAR_OF[b]: b for b in range(256)}
    merges = []
    for context in (CHAR_OF[ord(c)] for c in "x1' \n"):
        for byte in range(256):
            for pair in ((context, CHAR_OF[byte]), (CHAR_OF[byte], context)):
                if pair[0] + pair[1] not in vocab:
                    vocab[pair[0] + pair[1]] = len(vocab)
                    merges.append(pair)
    path = _write(tmp_path / "contexts.json", vocab, merges, pattern, ignore_merges=pattern != "gpt2")
    assert tiktoken_bpe.exactness_problem(path) == ""
    points = [*range(0, 0xD800), *range(0xE000, 0x10000), *range(0x10000, 0x20000, 4), *range(0x20000, 0x40000, 32),
              *range(0xE0000, 0xE1000, 4)]
    texts = ["".join(f"x{chr(c)}x'{chr(c)}x {chr(c)}1\n{chr(c)}" for c in points[i:i + 256])
             for i in range(0, len(points), 256)]
    reference, fast = _ids_both_ways(path, texts)
    assert _first_difference(reference, fast, texts) is None


def _jsonl_task(tmp_path, texts):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return sources.make_tasks("jsonl", [path])


def _spec(path):
    return TokenizerSpec(path, None, 2000, (), (), (), ())


def test_the_driver_checks_the_first_documents_and_falls_back_with_one_note(tmp_path, corpus, texts, monkeypatch,
                                                                            capsys):
    path = _trained(tmp_path, "llama3", corpus)
    tasks = _jsonl_task(tmp_path, texts)
    assert encoders.choose_encoder(_spec(path), tasks, "jsonl", "text").encoder == "tiktoken"
    assert capsys.readouterr().out == ""

    wrong = tiktoken_bpe.split_pattern  # planted: tiktoken built with GPT-2's regex for Llama 3's split
    monkeypatch.setattr(tiktoken_bpe, "split_pattern", lambda config: (tiktoken_bpe.GPT2_PATTERN, wrong(config)[1]))
    assert encoders.choose_encoder(_spec(path), tasks, "jsonl", "text").encoder == "tokenizers"
    note = capsys.readouterr().out.strip().splitlines()
    assert len(note) == 1 and "differ" in note[0] and "tokenizers" in note[0]
    monkeypatch.undo()

    config = json.loads(open(path).read())
    config["normalizer"] = {"type": "NFC"}
    normalized = tmp_path / "normalized.json"
    normalized.write_text(json.dumps(config))
    assert encoders.choose_encoder(_spec(str(normalized)), tasks, "jsonl", "text").encoder == "tokenizers"
    assert capsys.readouterr().out == ""  # not a tiktoken shape: no note, the reference path


def test_documents_that_are_not_utf8_go_to_tokenizers(tmp_path, corpus):
    """A lone surrogate (JSON allows "\\ud800") is not UTF-8: tiktoken's batch goes to `tokenizers`, which refuses
    it as it always did."""
    path = _trained(tmp_path, "gpt2", corpus, vocab=400)
    encoder = encoders.TiktokenEncoder(path)
    ids = encoder.encode_batch(["plain text"])
    assert ids[0].tolist() == Tokenizer.from_file(path).encode("plain text", add_special_tokens=False).ids
    with pytest.raises(TypeError):
        encoder.encode_batch(["plain", json.loads('"a\\ud800b"')])


def test_prepare_data_switches_its_processes_to_tokenizers_when_the_check_fails(tmp_path, corpus, texts, monkeypatch,
                                                                               capsys):
    """The tokenizing processes build tiktoken while the driver checks; the driver's check fails (a wrong regex
    planted in the driver only), so each process encodes with `tokenizers` and the token file is the reference's."""
    from launch.prepare_command import ensure_prepared
    from spec.config import load_job_config
    from spec.prepared import OFFSETS_FILE, TOKENS_FILE

    path = _trained(tmp_path, "llama3", corpus)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    wrong = tiktoken_bpe.split_pattern
    monkeypatch.setattr(tiktoken_bpe, "split_pattern", lambda config: (tiktoken_bpe.GPT2_PATTERN, wrong(config)[1]))
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64 * 1024)  # several tasks, so a pool of two processes
    job = load_job_config(None, ["data.source=jsonl", f"data.path={source}", f"data.tokenizer={path}",
                                 f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=2000", "data.seq_len=256"])
    prepared = ensure_prepared(job, workers=2)
    assert prepared.summary["workers"] == 2 and prepared.summary["encoder"] == "tokenizers"
    assert "differ" in capsys.readouterr().out
    tokens = np.fromfile(prepared.directory / TOKENS_FILE, dtype=prepared.summary["token_dtype"])
    offsets = np.load(prepared.directory / OFFSETS_FILE)
    reference = Tokenizer.from_file(path).encode_batch_fast([t for t in texts if t], add_special_tokens=False)
    assert [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == [e.ids for e in reference]
