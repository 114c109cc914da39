"""Weights on disk: hub and mlx-lm layouts, loading, conversion, random test checkpoints."""
