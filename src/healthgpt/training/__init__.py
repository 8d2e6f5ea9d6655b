"""Training HealthGPT with the paper's three-stage strategy: stage definitions as data, one accelerate loop."""
