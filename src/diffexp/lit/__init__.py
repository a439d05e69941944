"""LightningModules: the only place where training meets Lightning."""
from diffexp.lit.pixel import PixelDiffusion

__all__ = ["PixelDiffusion"]
