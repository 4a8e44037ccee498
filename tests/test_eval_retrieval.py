"""Passkey retrieval is learned and scored (issue 22): a tiny model of our own class, trained a few hundred steps on
passkey prompts made here, solves the passkey through `longtrain eval` on a Hugging Face directory (the CLI, its
scorer and its prompts), and the same model before training is at chance. The test fails if the scorer, the
prompts, the model's forward or the loading of the weights break retrieval.

Why it learns in seconds: a word-level tokenizer whose tokens are the template's phrases, the filler's sentences and
single digits (so a 48-token prompt holds 32 filler sentences), 2-digit keys, the loss only on the answer positions
(the rest of the prompt is fixed or unpredictable), and 8 heads in 2 layers: the first digit is a look-up of the
token after the needle's "The pass key is", the second an induction step (the token that followed the first digit
in the needle)."""

import dataclasses
import json

import numpy as np
import torch

from launch.cli import main
from orchestrator.checkpoint.export import hf_names, write_metadata, write_shards
from orchestrator.eval.passkey import INTRO, NEEDLE, QUESTION, REPEATED, Codec, make_prompt, min_length
from orchestrator.model import LlamaModel
from spec.config import load_job_config

LENGTH, DIGITS, STEPS, BATCH, LEARNING_RATE = 48, 2, 200, 16, 4e-3
PHRASES = r"\d|\n|\s*[^\d\s.?][^\d.?\n]*[.?]?\s*|[.?]\s*"
"""One piece per digit, per phrase up to its full stop or question mark, per newline."""
EVAL = [f"eval.lengths=[{LENGTH}]", f"eval.length={LENGTH}", f"eval.digits={DIGITS}", "eval.filler=repeated",
        "eval.depths=[0,0.25,0.5,0.75,1]", "eval.trials=8", "eval.sequences=1", "eval.seed=5"]
CHANCE = 1 / 90
"""Greedy decoding guessing a 2-digit key (10-99)."""


def phrase_tokenizer(path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    split = pre_tokenizers.Split(Regex(PHRASES), behavior="isolated")
    pieces = {piece for text in (INTRO, NEEDLE.format(key="0123456789"), QUESTION, REPEATED)
              for piece, _ in split.pre_tokenize_str(text)}
    tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(["[UNK]", *sorted(pieces)])},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = split
    tokenizer.save(str(path))
    return tokenizer.get_vocab_size()


def save_hf(model: LlamaModel, out, tokenizer_file) -> None:
    """The model as a Hugging Face directory, written by the export's own functions, with the tokenizer."""
    out.mkdir()
    write_shards(model.state_dict(), hf_names(model.config), out, torch.float32, 1 << 30)
    write_metadata(out, model.config, 2 * LENGTH, "float32", None)
    (out / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())


def train_to_retrieve(model: LlamaModel, codec: Codec, filler: np.ndarray) -> float:
    """AdamW on batches of fresh passkey prompts (random keys and depths, never the evaluation's seed), the loss
    on the answer tokens only; returns the last loss."""
    rng = np.random.default_rng(1234)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    model.train()
    for _ in range(STEPS):
        inputs, targets = [], []
        for _ in range(BATCH):
            key = str(int(rng.integers(10 ** (DIGITS - 1), 10 ** DIGITS)))
            prompt = make_prompt(codec, filler, LENGTH, float(rng.random()), key, rng)
            tokens = torch.tensor(prompt.tokens)
            target = tokens[1:].clone()
            target[:-prompt.answer] = -100
            inputs.append(tokens[:-1])
            targets.append(target)
        loss = model(torch.stack(inputs), targets=torch.stack(targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def test_a_model_trained_on_passkeys_retrieves_them_and_an_untrained_one_does_not(tmp_path, capsys, one_thread):
    vocab = phrase_tokenizer(tmp_path / "tokenizer.json")
    codec = Codec(tmp_path / "tokenizer.json")
    assert min_length(codec, DIGITS) < LENGTH // 2  # most of the prompt is filler
    filler = np.asarray(codec.encode(REPEATED * 8))
    shape = dataclasses.replace(load_job_config(None, []).model, vocab_size=vocab, hidden_size=64, num_layers=2,
                                num_heads=8, num_kv_heads=8, intermediate_size=128)
    torch.manual_seed(0)
    model = LlamaModel(shape)
    save_hf(model, tmp_path / "untrained", tmp_path / "tokenizer.json")
    loss = train_to_retrieve(model, codec, filler)
    save_hf(model, tmp_path / "trained", tmp_path / "tokenizer.json")
    assert main(["eval", str(tmp_path / "untrained"), str(tmp_path / "trained"), *EVAL,
                 "--out", str(tmp_path / "eval")]) == 0
    print(capsys.readouterr().out)
    untrained, trained = json.loads((tmp_path / "eval" / "results.json").read_text())["models"]
    solved = {m["label"]: sum(c["solved"] for c in m["cells"]) / sum(c["trials"] for c in m["cells"])
              for m in (untrained, trained)}
    assert solved["untrained"] <= 3 * CHANCE, solved
    assert solved["trained"] >= 0.6, (solved, loss)
    assert min(c["accuracy"] for c in trained["cells"]) >= 0.25, trained["cells"]  # at every depth
