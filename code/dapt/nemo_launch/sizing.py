"""Sizing: Llama 2 architectures, parameter counts and a per-GPU memory estimate for the launch plan."""

from __future__ import annotations

from typing import Any

from dapt.config import Profile

# Llama 2 architectures (config.json of meta-llama/Llama-2-{7b,13b,70b}-hf); used for sizing.
LLAMA2_ARCH = {
    "7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "13b": {
        "hidden_size": 5120,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "intermediate_size": 13824,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "70b": {
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
}


def parameter_count(arch: dict[str, Any], vocab_size: int) -> int:
    """Parameters of a Llama model (untied embeddings, RMSNorm, SwiGLU MLP, grouped-query attention)."""
    h, layers, ffn = arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads", heads) * (h // heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * ffn + 2 * h
    return 2 * vocab_size * h + layers * per_layer + h


def estimate_memory_gb(
    arch: dict[str, Any], vocab_size: int, profile: Profile, micro_batch_size: int
) -> dict:
    """Rough per-GPU memory for bf16 O2 training with Adam (no distributed optimizer, no recomputation).

    Model states: 18 bytes/parameter (bf16 weight 2 + fp32 main weight 4 + fp32 grad 4 + Adam m, v 8),
    split over TP x PP. Activations: 34 x seq x micro_batch x hidden bytes per layer / TP with
    sequence parallelism and flash attention (Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models"), layers/PP per stage, up to PP micro batches in flight
    (1F1B), plus fp32 logits and their gradient (8 x seq x micro_batch x vocab / TP bytes).
    """
    tp, pp = profile.tensor_parallel, profile.pipeline_parallel
    params = parameter_count(arch, vocab_size)
    states = params * 18 / (tp * pp)
    tokens = profile.seq_length * micro_batch_size
    layers_per_stage = arch["num_hidden_layers"] / pp
    activations = 34 * tokens * arch["hidden_size"] * layers_per_stage / tp * pp
    logits = 8 * tokens * vocab_size / tp
    total = states + activations + logits
    return {
        "parameters": params,
        "parameters_billion": round(params / 1e9, 2),
        "model_states_gb": round(states / 1e9, 1),
        "activations_gb": round((activations + logits) / 1e9, 1),
        "total_gb": round(total / 1e9, 1),
        "fits": total / 1e9 < profile.gpu_memory_gb * 0.95,
    }
