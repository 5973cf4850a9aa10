"""Datasets, missing-modality simulation, label partitioning and cached embeddings."""
