"""End-to-end tests: torch.compile(backend="seqpar") on models, options, explain, diffusion loops, the GPU check."""
