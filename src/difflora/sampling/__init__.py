"""Sampling a model callable: labels and conditions per sample, guidance, batches of samples."""
