"""HealthGPT: medical image understanding and generation with one autoregressive LLM."""

__version__ = "0.1.0"
