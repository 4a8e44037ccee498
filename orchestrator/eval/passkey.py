"""Passkey retrieval: a random number hidden at a chosen depth of filler text of a chosen length, which the model
must reproduce after the question (Mohtashami & Jaggi 2023; the simplest RULER needle).

Scored by greedy decoding, computed in one forward: the prompt followed by the true passkey is run once, and the
trial counts as solved when the model's argmax at every answer position is the passkey's next token. Greedy
decoding would emit exactly the passkey then (each step's input is the true prefix so far), and it errs at the first
position where the argmax differs, so this equals greedy decoding with a KV cache (up to exact ties) without a
cache or a decoding loop. Chance is about vocab^-tokens (zero in practice); per-token accuracy is reported too."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from orchestrator.eval.forward import hidden_states

INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is "
REPEATED = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


class Codec:
    """Text to token ids: the model's tokenizer.json (without its special tokens; BOS as its template adds it), or
    byte tokens for a model trained on the bundled corpus."""

    def __init__(self, tokenizer_file: Optional[Path]):
        self.tokenizer, self.prefix = None, []
        if tokenizer_file is not None:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
            framed = self.tokenizer.encode("a", add_special_tokens=True).ids
            plain = self.tokenizer.encode("a", add_special_tokens=False).ids
            self.prefix = framed[:framed.index(plain[0])] if plain and plain[0] in framed else []

    def encode(self, text: str) -> List[int]:
        if self.tokenizer is None:
            return list(text.encode("utf-8"))
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def answer(self, question: str, key: str) -> List[int]:
        """The passkey's ids as they follow the question (a BPE may merge across the boundary otherwise)."""
        asked, whole = self.encode(question), self.encode(question + key)
        return whole[len(asked):] if whole[:len(asked)] == asked else self.encode(key)


@dataclass
class Prompt:
    tokens: List[int]
    answer: int
    """The last `answer` tokens are the passkey."""
    needle_at: int


@dataclass
class Cell:
    length: int
    depth: float
    trials: int
    solved: int
    token_accuracy: float

    @property
    def accuracy(self) -> float:
        return self.solved / self.trials


def min_length(codec: Codec, digits: int) -> int:
    """Tokens a prompt needs without filler."""
    key = "9" * digits
    return len(codec.prefix) + len(codec.encode(INTRO)) + len(codec.encode(NEEDLE.format(key=key))) + len(
        codec.answer(QUESTION, key)) + len(codec.encode(QUESTION))


def make_prompt(codec: Codec, filler: np.ndarray, length: int, depth: float, key: str,
                rng: np.random.Generator) -> Prompt:
    """A prompt of `length` tokens (answer included): intro, filler cut at `depth`, the needle, the rest of the
    filler, the question and the passkey. The filler is a random stretch of `filler` (wrapped around)."""
    head = codec.prefix + codec.encode(INTRO)
    needle, question, answer = codec.encode(NEEDLE.format(key=key)), codec.encode(QUESTION), codec.answer(QUESTION, key)
    budget = length - len(head) - len(needle) - len(question) - len(answer)
    start = int(rng.integers(0, len(filler)))
    stretch = np.take(filler, np.arange(start, start + budget), mode="wrap").tolist()
    cut = int(round(depth * budget))
    tokens = head + stretch[:cut] + needle + stretch[cut:] + question + answer
    return Prompt(tokens, len(answer), len(head) + cut)


def model_scorer(model: torch.nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """(inputs [S], n) -> logits [n, vocab] at the last n positions, through eval's forward (lm_head on those
    positions only)."""
    @torch.inference_mode()
    def score(inputs: torch.Tensor, last: int) -> torch.Tensor:
        hidden = hidden_states(model, inputs[None].to(model.embed.weight.device))[0, -last:]
        return model.lm_head(hidden).float().cpu()

    return score


def run_trial(score: Callable[[torch.Tensor, int], torch.Tensor], prompt: Prompt) -> torch.Tensor:
    """Which answer tokens greedy decoding gets right, given the true prefix ([answer] bools)."""
    tokens = torch.tensor(prompt.tokens)
    logits = score(tokens[:-1], prompt.answer)
    return logits.argmax(-1) == tokens[-prompt.answer:]


def run_grid(score, codec: Codec, filler: np.ndarray, lengths: Sequence[int], depths: Sequence[float], trials: int,
             digits: int, seed: int, progress=None) -> List[Cell]:
    """Accuracy per (length, depth) cell over `trials` random passkeys (the same keys and filler stretches for every
    model given the same seed, so models are compared on the same prompts)."""
    cells = []
    for length in lengths:
        for depth in depths:
            rng = np.random.default_rng([seed, length, int(depth * 1e6)])
            solved, right = 0, 0.0
            for _ in range(trials):
                key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
                hits = run_trial(score, make_prompt(codec, filler, length, depth, key, rng))
                solved += bool(hits.all())
                right += float(hits.float().mean())
                if progress is not None:
                    progress.update(1)
            cells.append(Cell(length, depth, trials, solved, right / trials))
    return cells
