"""Networks (pure torch): the U-Net, the autoencoder and their building blocks."""
from diffexp.nets.autoencoder import AutoencoderKL, DiagonalGaussian
from diffexp.nets.unet import UNet

__all__ = ["AutoencoderKL", "DiagonalGaussian", "UNet"]
