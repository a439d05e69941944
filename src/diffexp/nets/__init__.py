"""Networks (pure torch): the U-Net and its building blocks."""
from diffexp.nets.unet import UNet

__all__ = ["UNet"]
