"""The diffusion math: noise schedules, denoiser wrappers, samplers, guidance and image-to-image."""
