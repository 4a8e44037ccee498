"""OpenAI's `tiktoken` (a Rust regex split and BPE) built from a Hugging Face byte-level BPE `tokenizer.json`, only
where it gives exactly the ids the `tokenizers` library gives; `tokenizers` stays the reference and the fallback.

Why: `prepare-data`'s time is the `tokenizers` pre-tokenizer and its work per word (4-5 MB per CPU-second, issue 17);
tiktoken does the same split and merges several times faster.

Both split a text at the added tokens, then into pieces by one regex, then turn each piece's UTF-8 bytes into ids
by BPE. Their BPEs differ in what may merge: `tokenizers` merges a pair only if the merge list has it, ranked by
its place there (lowest first, the leftmost among equals); tiktoken merges any two adjacent parts whose bytes
form a token, ranked by that token's id (the leftmost among equals), and takes a piece that is a token whole. With
the ids as ranks they give the same ids when (`exactness_problem` checks each; a proof sketch: in any text, a span
whose ends stay part boundaries evolves as it would alone, so two parts forming a token that the merges did not
make there would not form there alone either):

- ranks follow the merge list: the merges' result ids never decrease along it;
- every token's own bytes, through the merges alone, give what tiktoken gives them without the whole-piece
  shortcut (normally the token itself), so tiktoken can merge no pair that the merges cannot;
- where one token has several merges (tokenizers converted from tiktoken, like Llama 3's), two of its merges that
  can stand side by side are merged in the same order by both (the leftmost first), or the order changes nothing.

And the shape: a BPE model without dropout, unknown token, word prefixes/suffixes or byte fallback; no normalizer;
the pre-tokenizer `ByteLevel(add_prefix_space=False)` (GPT-2's regex) or `Split(<a known regex>, "isolated")`
then `ByteLevel(add_prefix_space=False, use_regex=False)` (a known regex because tiktoken keeps only the matches:
these match every character); every byte a token; added tokens matched as plain strings, none a prefix of
another. The two regex engines (Oniguruma, fancy-regex) are checked against each other by the tests and by the
driver on each run's first documents (`launch/prepare/encoders.py`).
"""

import json
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
"""The split of `tokenizers`' ByteLevel pre-tokenizer with use_regex=True (GPT-2's)."""
KNOWN_PATTERNS = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt2": GPT2_PATTERN,
}
"""Split regexes known to match every character (tiktoken drops what its regex does not match)."""


@lru_cache(maxsize=1)
def byte_of_char() -> Dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte in a byte-level vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def split_pattern(config: dict) -> Tuple[Optional[str], str]:
    """(the regex tiktoken would split with, "") when the normalizer and pre-tokenizer have a shape tiktoken
    reproduces, else (None, why not)."""
    if config.get("normalizer"):
        return None, f"a normalizer ({config['normalizer'].get('type')})"
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _plain_byte_level(steps[0], use_regex=True):
        return GPT2_PATTERN, ""
    if len(steps) == 2 and steps[0].get("type") == "Split" and _plain_byte_level(steps[1], use_regex=False):
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") != "Isolated" or split.get("invert"):
            return None, f"a Split pre-tokenizer with behavior {split.get('behavior')}, invert {split.get('invert')}"
        if pattern not in KNOWN_PATTERNS.values():
            return None, "a Split regex that is not one known to match every character (GPT-2's, Llama 3's, Qwen2's)"
        return pattern, ""
    return None, f"the pre-tokenizer {json.dumps(pre)[:120]}"


def _plain_byte_level(step: dict, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
            and bool(step.get("use_regex", True)) == use_regex)


def _merge_pairs(model: dict) -> List[Tuple[str, str]]:
    """The merges as pairs (tokenizer.json writes "a b" strings or, since tokenizers 0.20, [a, b] lists)."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model.get("merges", [])]


def model_problem(model: dict) -> str:
    if model.get("type") != "BPE":
        return f"a {model.get('type')} model, not BPE"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"BPE {key}={model[key]!r}"
    if model.get("byte_fallback"):
        return "BPE byte_fallback"
    return ""


def mergeable_ranks(config: dict) -> Dict[bytes, int]:
    """Each model token's bytes and id (added tokens left out: tiktoken matches them as special tokens)."""
    chars = byte_of_char()
    added = {token["id"] for token in config.get("added_tokens", [])}
    return {bytes(chars[c] for c in token): id_ for token, id_ in config["model"]["vocab"].items()
            if id_ not in added}


def special_tokens(config: dict) -> Dict[str, int]:
    return {token["content"]: token["id"] for token in config.get("added_tokens", [])}


def added_tokens_problem(config: dict) -> str:
    tokens = config.get("added_tokens", [])
    for token in tokens:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"the added token {token['content']!r} strips spaces or matches single words"
    contents = sorted({token["content"] for token in tokens})  # a prefix sorts just before a string it starts
    for content, following in zip(contents, contents[1:]):
        if following.startswith(content):
            return f"the added token {content!r} is a prefix of another ({following!r})"
    return ""


def shape_problem(config: dict) -> str:
    """"" when the model, normalizer, pre-tokenizer and added tokens have a shape tiktoken reproduces."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return "tiktoken is not installed"
    return model_problem(config.get("model") or {}) or split_pattern(config)[1] or added_tokens_problem(config)


def encoding(path: str):
    """The tiktoken Encoding of a tokenizer.json (shape not checked here: `exactness_problem` does that)."""
    import tiktoken

    config = read_json(path)
    pattern, _ = split_pattern(config)
    return tiktoken.Encoding(f"longtrain:{path}", pat_str=pattern, mergeable_ranks=mergeable_ranks(config),
                             special_tokens=special_tokens(config))


def exactness_problem(path: str) -> str:
    """"" when tiktoken built from this tokenizer.json gives the ids `tokenizers` gives on every text, else why
    not (the module docstring says what is checked)."""
    config = read_json(path)
    problem = shape_problem(config)
    if problem:
        return problem
    model = config["model"]
    chars = byte_of_char()
    vocab: Dict[str, int] = model["vocab"]
    added = {token["id"] for token in config.get("added_tokens", [])}
    ordinary = {token: id_ for token, id_ in vocab.items() if id_ not in added}
    if any(c not in chars for token in ordinary for c in token):
        return "a vocabulary entry outside the byte-level alphabet"
    if not all(c in ordinary for c in chars):
        return "not every byte is a token"
    merges = _merge_pairs(model)
    return _rank_problem(merges, ordinary) or _self_problem(config, ordinary) or _tie_problem(merges, ordinary)


def _rank_problem(merges: List[Tuple[str, str]], vocab: Dict[str, int]) -> str:
    """Ranks follow the merge list: result ids never decrease along it."""
    last = -1
    for rank, (left, right) in enumerate(merges):
        result = vocab.get(left + right)
        if result is None or left not in vocab or right not in vocab:
            return f"merge {rank} ({left!r}, {right!r}) names a token outside the vocabulary"
        if result < last:
            return f"merge {rank} makes id {result} after a merge made id {last} (merge order and ids disagree)"
        last = result
    return ""


def _self_problem(config: dict, vocab: Dict[str, int]) -> str:
    """Every token's own bytes, through the merges alone (no whole-word shortcut), give what tiktoken's merges
    give them without its shortcut; without ignore_merges, the token itself (tiktoken takes a piece that is a token
    whole, `tokenizers` then merges it)."""
    from tokenizers import Tokenizer

    model = dict(config["model"], ignore_merges=False, vocab=vocab)
    bare = {"version": config.get("version", "1.0"), "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None, "model": model}
    merges_only = Tokenizer.from_str(json.dumps(bare))
    tokens = [token for token in vocab if len(token) > 1]
    chars = byte_of_char()
    ranks = {bytes(chars[c] for c in token): id_ for token, id_ in vocab.items()}
    for token, encoded in zip(tokens, merges_only.encode_batch_fast(tokens, add_special_tokens=False)):
        if encoded.ids != [vocab[token]]:
            if not config["model"].get("ignore_merges"):  # tiktoken takes a piece that is a token whole
                return (f"the token {token!r} (id {vocab[token]}) encodes through the merges as {encoded.ids}, "
                        "and the model has no ignore_merges")
            tiktoken_ids = _tiktoken_merges(bytes(chars[c] for c in token), ranks)
            if encoded.ids != tiktoken_ids:
                return (f"the token {token!r} (id {vocab[token]}) encodes through the merges as {encoded.ids}, "
                        f"through tiktoken's as {tiktoken_ids}")
    return ""


def _tiktoken_merges(piece: bytes, ranks: Dict[bytes, int]) -> List[int]:
    """tiktoken's byte-pair merge of one piece, without its whole-piece shortcut: repeatedly join the adjacent
    parts whose bytes form the lowest-ranked token (the leftmost among equals)."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best = min(((ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)
                    if parts[i] + parts[i + 1] in ranks), default=None)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[part] for part in parts]


def _tie_problem(merges: List[Tuple[str, str]], vocab: Dict[str, int]) -> str:
    """Where a token has several merges, two of them side by side ([x][y][x'][y'], or overlapping [x][y][y'] when
    x+y = y+y') are merged leftmost first by tiktoken and by merge rank by `tokenizers`. The order matters when the
    right one ranks first and they overlap, or the token then joins its left (right) neighbour into a lower-ranked
    token, taking a part the other needs; and only if the merges can reach those parts side by side at all, which
    they do in some text only if they do in the parts' own bytes alone (a span whose ends stay part boundaries
    evolves as it does alone), so those bytes are run through the merges to see."""
    chars = byte_of_char()
    by_token: Dict[str, List[Tuple[int, str, str]]] = {}
    for rank, (left, right) in enumerate(merges):
        by_token.setdefault(left + right, []).append((rank, left, right))
    merge_ranks: Dict[Tuple[bytes, bytes], int] = {}
    for token, made in by_token.items():
        if len(made) < 2:
            continue
        id_ = vocab[token]
        for rank_a, x, y in made:  # the left one
            for rank_b, x2, y2 in made:  # the right one, merged first by `tokenizers`
                if rank_b >= rank_a:
                    continue
                if y == x2:
                    parts = (x, y, y2)
                elif vocab.get(y + token, id_) < id_ or vocab.get(token + x2, id_) < id_:
                    parts = (x, y, x2, y2)
                else:
                    continue
                if not merge_ranks:
                    merge_ranks = {(_bytes(a, chars), _bytes(b, chars)): r for r, (a, b) in enumerate(merges)}
                if tuple(_bytes(p, chars) for p in parts) in _merge_states(_bytes("".join(parts), chars), merge_ranks):
                    return (f"the token {token!r} has merges ({x!r}, {y!r}) and ({x2!r}, {y2!r}) that meet in "
                            f"{''.join(parts)!r} and are merged in another order by tokenizers (merge rank) than by "
                            "tiktoken (leftmost)")
    return ""


def _bytes(token: str, chars: Dict[str, int]) -> bytes:
    return bytes(chars[c] for c in token)


def _merge_states(piece: bytes, merge_ranks: Dict[Tuple[bytes, bytes], int]) -> set:
    """Every state (tuple of parts) `tokenizers`' BPE passes through on one piece: the adjacent pair with the
    lowest merge rank joins first, the leftmost among equals."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    states = {tuple(parts)}
    while True:
        best = min(((merge_ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in merge_ranks),
                   default=None)
        if best is None:
            return states
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        states.add(tuple(parts))
