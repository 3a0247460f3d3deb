"""Model loading and generation engine for mlx-serving."""
