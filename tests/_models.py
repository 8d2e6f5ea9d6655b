"""Helpers for tests that need plugins which really differ from the base model."""

from __future__ import annotations

import torch

from healthgpt.api import HealthGPT
from healthgpt.config import HealthGPTConfig


def with_random_adapters(model: HealthGPT, seed: int = 0, std: float = 0.05) -> HealthGPT:
    """Give every plugin's B matrices random values (training init leaves them zero, i.e. a no-op plugin)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.model.hlora.plugin_names:
            for key, tensor in model.model.hlora.plugin_state_dict(name).items():
                if key.endswith("lora_B.weight"):
                    tensor.copy_(torch.randn(tensor.shape, generator=g) * std)
    return model


def random_model(config: HealthGPTConfig | str = "nano", seed: int = 0) -> HealthGPT:
    return with_random_adapters(HealthGPT.random(config, seed=seed), seed)
