"""catalog-gen: per-product DreamBooth-LoRA adapters and gated catalogue image generation."""

__version__ = "0.1.0"
