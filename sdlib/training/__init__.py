"""Training: the resumable, data-parallel loop and the training objectives it runs."""
