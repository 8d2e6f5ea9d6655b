"""Training and evaluation data: synthetic phantoms, datasets and collation."""
