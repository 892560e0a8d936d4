"""mmalign: preference-tune image and video diffusion models on diffusers pipelines."""

__version__ = "0.1.0"
