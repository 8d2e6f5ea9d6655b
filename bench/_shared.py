"""What several benchmarks share: model sizes and questions (so figures compare like with like), and the naive
MoE-LoRA baseline H-LoRA is measured against."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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


class NaiveMoELoRA(nn.Module):
    """MoELoRA as usually written: k separate LoRA experts of rank R/k (B zero-initialised), each output weighted by
    its gate, then summed: k small products where H-LoRA does one fused product."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, num_experts: int) -> None:
        super().__init__()
        r = rank // num_experts
        self.base = base
        self.experts_A = nn.ModuleList(nn.Linear(base.in_features, r, bias=False) for _ in range(num_experts))
        self.experts_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for _ in range(num_experts))
        self.route = nn.Linear(base.in_features, num_experts, bias=False)
        self.scaling = alpha / rank * num_experts
        for b in self.experts_B:
            nn.init.zeros_(b.weight)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.softmax(self.route(x), dim=-1)  # [..., k]
        y = self.base(x)
        for e, (a, b) in enumerate(zip(self.experts_A, self.experts_B, strict=True)):
            y = y + gate[..., e : e + 1] * b(a(x)) * self.scaling
        return y
