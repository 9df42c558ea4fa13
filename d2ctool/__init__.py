"""d2c: two-stage discrete -> continuous autoregressive image generation (D2C, DisCon)."""

__version__ = "0.1.0"
