"""Dataset loaders for training jobs."""
