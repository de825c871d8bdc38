"""latentgen: latent diffusion (Rombach et al., arXiv 2112.10752) from the command line."""

__version__ = "0.1.0"
