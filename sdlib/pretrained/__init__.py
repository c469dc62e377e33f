"""Pretrained Stable Diffusion v1.x checkpoints loaded into sdlib's own models."""
