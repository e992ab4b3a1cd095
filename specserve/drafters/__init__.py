"""Trained draft heads (EAGLE) that read the target's features: model, on-disk format, training."""
