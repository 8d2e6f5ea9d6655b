"""Model sizes the benchmarks share, so their figures compare like with like."""

from __future__ import annotations

from healthgpt.config import HealthGPTConfig, LLMConfig, get_variant

QUESTIONS = ["Is there a lesion in this CT image?", "Which side is the lesion on?", "How many lesions are there?"]


def small_config() -> HealthGPTConfig:
    """nano's architecture with a 512-wide, 8-layer Phi-3 LLM (about 30 M LLM parameters)."""
    llm = LLMConfig(
        arch="phi3",
        source="small",
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        intermediate_size=1408,
        vocab_rows=512,
        max_position_embeddings=2048,
    )
    return get_variant("nano").replace(name="small", llm=llm)
