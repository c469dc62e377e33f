"""sdlib: Stable Diffusion from scratch, the library behind the DVC stages in `stages/`."""
