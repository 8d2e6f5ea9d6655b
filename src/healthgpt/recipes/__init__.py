"""End-to-end recipes: from nothing to a trained, evaluated, exported HealthGPT (`nano`: the phantom world on a CPU)."""
