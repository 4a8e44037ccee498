"""Write a tiny random Hugging Face causal LM (config.json, safetensors, a byte-level tokenizer) to try
`model.init_from` and `longtrain export` on a CPU in minutes, without downloading a model.

    python docs/examples/make_tiny_hf_model.py /tmp/tiny-llama [--architecture llama|mistral|qwen2]
        [--rope-scaling none|linear|llama3|yarn] [--untied]

The shape is small (hidden 128, 4 layers, 4 heads, 2 KV heads, a 320-token vocabulary that covers longtrain's
byte-token corpus); the weights are random (seeded). transformers writes the directory, so it is what a published
model looks like: Llama-3-style RoPE theta 500000, and the RoPE scaling asked for (llama3 as Llama 3.1 ships it).
Needs `transformers` (pip install -e ".[test]").
"""

import argparse
from pathlib import Path

ROPE_SCALING = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}
VOCAB_SIZE = 320


def make_model(out: Path, architecture: str = "llama", rope_scaling: str = "none", tied: bool = True,
               seed: int = 0, **shape) -> Path:
    """Save a random model of that architecture into `out` (created); returns `out`."""
    import torch
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[architecture]
    settings = dict(vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=352, max_position_embeddings=1024, rms_norm_eps=1e-5,
                    rope_theta=500000.0, rope_scaling=ROPE_SCALING[rope_scaling], tie_word_embeddings=tied,
                    bos_token_id=257, eos_token_id=258)
    settings.update(shape)
    if architecture == "mistral":
        settings["sliding_window"] = None  # longtrain attends to the whole sequence
    torch.manual_seed(seed)
    model = model_class(config_class(**settings))
    with torch.no_grad():  # norms and biases random too, so a loader that skips them is caught
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(out)
    _byte_tokenizer().save_pretrained(out)
    return Path(out)


def _byte_tokenizer():
    """A byte-level tokenizer whose ids are the bytes themselves (0-255, as longtrain's corpus tokens are), plus
    <unk>, <s>, </s> at 256-258: a BPE without merges over GPT-2's byte-to-character table."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab.update({"<unk>": 256, "<s>": 257, "</s>": 258})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _bytes_to_unicode() -> dict:
    """GPT-2's table: every byte as a printable character (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--architecture", choices=("llama", "mistral", "qwen2"), default="llama")
    parser.add_argument("--rope-scaling", choices=tuple(ROPE_SCALING), default="none")
    parser.add_argument("--untied", action="store_true", help="a separate lm_head (default: tied embeddings)")
    args = parser.parse_args()
    out = make_model(args.out, args.architecture, args.rope_scaling, not args.untied)
    print(f"wrote a random {args.architecture} model (RoPE scaling {args.rope_scaling}) to {out}")


if __name__ == "__main__":
    main()
