"""Model shape presets: `model.preset=NAME` fills the shape; keys written next to it override single fields.

Shapes follow the published configs of the models they are named after (Llama-2-7B, Llama-3-8B,
Llama-3.2-1B), so plans and MFU figures are comparable with papers that report those models.
"""

from typing import Any, Dict

MODEL_PRESETS: Dict[str, Dict[str, Any]] = {
    "debug": dict(vocab_size=256, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                  intermediate_size=352, rope_theta=10000.0, tie_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                     intermediate_size=8192, rope_theta=500000.0, tie_embeddings=True),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                     intermediate_size=11008, rope_theta=10000.0, tie_embeddings=False),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      intermediate_size=14336, rope_theta=500000.0, tie_embeddings=False),
}
