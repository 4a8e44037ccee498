"""The prepared form of a text source: what `longtrain prepare-data` writes, the worker's loader reads and the planner
takes the document-length distribution from.

Why a contract of its own: three readers share one directory per content hash (source files + tokenizer). The
loader memory-maps the token file (the flat binary `data.source=tokens` already reads) and the document offsets;
the planner and the runtime's plan check read the packing summary of a sequence length (the share of causal
attention FLOPs that packed documents need), so a plan made for one data set is refused for another; the driver
finds the directory again by its hash. `summary.json` is written last: a directory without it is incomplete.
"""

import json
from pathlib import Path
from typing import Any, Dict, Optional

from spec.errors import ConfigError

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
"""Every document's token ids, one after another (dtype in the summary: uint16 below 65,536 ids, else uint32)."""
OFFSETS_FILE = "offsets.npy"
"""int64, documents + 1 entries: document i is tokens[offsets[i]:offsets[i + 1]]."""
SUMMARY_FILE = "summary.json"
HISTOGRAM_FILE = "lengths.png"


def packing_file(seq_len: int) -> str:
    """The packing table of a sequence length: int64 rows (first token, length, continues) of document pieces."""
    return f"packing-{seq_len}.npy"


def packing_sequences_file(seq_len: int) -> str:
    """Where each packed sequence's pieces start in the packing table (int64, sequences + 1 entries)."""
    return f"packing-{seq_len}-sequences.npy"


def packing_summary_file(seq_len: int) -> str:
    return f"packing-{seq_len}.json"


def read_json(path: Path, what: str) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {path} is missing; run `longtrain prepare-data CONFIG` (or `longtrain train`, "
                          "which prepares a missing text source itself)")
    return json.loads(path.read_text())


def read_summary(directory: str) -> Dict[str, Any]:
    """The prepared directory's summary (documents, tokens, token dtype, tokenizer vocabulary, lengths)."""
    return read_json(Path(directory) / SUMMARY_FILE, "prepared data summary")


def read_packing_summary(directory: str, seq_len: int) -> Dict[str, Any]:
    """Sequences, padding and attention share of the documents packed into sequences of `seq_len`."""
    return read_json(Path(directory) / packing_summary_file(seq_len), "packing summary")


def document_inputs(data) -> Dict[str, Any]:
    """What packed documents change in a plan (`spec.plan.plan_inputs`): the share of causal attention FLOPs they
    need and the length the attention kernel effectively runs at; empty for packing=stream, so plans of such jobs
    keep their hash."""
    stats = document_attention_stats(data)
    return {} if stats is None else {"documents": stats}


def document_attention_stats(data) -> Optional[Dict[str, float]]:
    """{attention_share, effective_length} of a job's packed documents (None: packing=stream). attention_share: the
    sum over documents of length^2 over sequences x seq_len^2 (what document masking leaves of causal attention);
    effective_length: that sum over the tokens (the FLOP-weighted mean document length)."""
    if not data.packs_documents:
        return None
    if not data.prepared:
        raise ConfigError(f"data.source={data.source} with data.packing=documents needs its prepared data; run "
                          "`longtrain prepare-data CONFIG` first (`longtrain train` runs it itself)")
    packing = read_packing_summary(data.prepared, data.seq_len)
    return {"attention_share": round(packing["attention_share"], 4),
            "effective_length": int(packing["effective_length"])}
