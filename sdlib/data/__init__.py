"""Data: image sources, captions, preprocessed splits, encoded latents and image I/O."""
