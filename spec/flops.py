"""Analytic parameter and FLOP counts from a model shape (pure arithmetic, shared by planner and metrics).

Convention: every weight matmul counts 2 FLOPs per multiply-add (the LM head included, the embedding lookup
not); attention scores and the weighted sum count 4 * seq_len * hidden FLOPs per token per layer forward over
the full square (`causal_halved=False`) or half of it (`causal_halved=True`, what a causal kernel does);
training = 3 x forward. Recomputation never enters: these are model FLOPs.
Packed documents (data.packing=documents) attend only within each document, so their attention counts the sum over
documents of length^2 in place of seq_len^2 (`attention_training_flops`), halved or not as above: the FLOPs the
masked attention needs, not the ones a full causal kernel would run.
"""

from spec.config import ModelConfig


def layer_matmul_params(model: ModelConfig) -> int:
    """Weights of one decoder layer's projections (q, k, v, o, gate, up, down)."""
    return attention_projection_params(model) + 3 * model.hidden_size * model.intermediate_size


def attention_projection_params(model: ModelConfig) -> int:
    """Weights of one layer's attention projections (q, k, v, o)."""
    kv_dim = model.num_kv_heads * model.head_dim
    return 2 * model.hidden_size * model.hidden_size + 2 * model.hidden_size * kv_dim


def matmul_params(model: ModelConfig) -> int:
    """Weights that take part in a matmul per token: all layers' projections plus the LM head."""
    return model.num_layers * layer_matmul_params(model) + model.hidden_size * model.vocab_size


def attention_forward_flops_per_token(model: ModelConfig, seq_len: int, causal_halved: bool = True) -> float:
    """Score and weighted-sum FLOPs of one layer's attention forward, per token of a seq_len sequence."""
    full = 4.0 * seq_len * model.hidden_size
    return full / 2 if causal_halved else full


def block_scoring_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Token elimination's exact block scoring: q.k of every causal pair over all query heads (LeMo's tile maxima
    take no weighted sum), half of a causal attention forward's FLOPs, per token of a seq_len sequence."""
    return attention_forward_flops_per_token(model, seq_len) / 2


def training_flops_per_token(model: ModelConfig, seq_len: int, causal_halved: bool = True) -> float:
    """Model FLOPs of forward + backward for one token of a seq_len-long sequence."""
    attention = model.num_layers * attention_forward_flops_per_token(model, seq_len, causal_halved)
    return 3.0 * (2 * matmul_params(model) + attention)


def bias_params(model: ModelConfig) -> int:
    """Biases of all layers' q/k/v projections (Qwen2; none for Llama and Mistral). Their FLOPs (one add per
    output) are left out of the model FLOPs, as the norms' are."""
    return model.num_layers * (model.hidden_size + 2 * model.num_kv_heads * model.head_dim) if model.qkv_bias else 0


def matmul_training_flops_per_token(model: ModelConfig) -> float:
    """Forward + backward FLOPs of every weight matmul for one token (no attention scores)."""
    return 3.0 * 2 * matmul_params(model)


def attention_training_flops(model: ModelConfig, sum_squared_lengths: float, causal_halved: bool = True) -> float:
    """Forward + backward attention FLOPs of all layers over sequences (or packed documents) whose lengths squared sum
    to `sum_squared_lengths`: each attends within itself."""
    full = 4.0 * model.hidden_size * sum_squared_lengths * model.num_layers
    return 3.0 * (full / 2 if causal_halved else full)


def parameter_count(model: ModelConfig) -> int:
    """Distinct parameters of the model, from its shape alone (no weights are allocated)."""
    norms = (2 * model.num_layers + 1) * model.hidden_size
    embedding = 0 if model.tie_embeddings else model.vocab_size * model.hidden_size
    return matmul_params(model) + embedding + norms + bias_params(model)
