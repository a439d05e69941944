"""Networks (pure torch): the denoisers (U-Net, DiT) behind one contract, the autoencoder, their building blocks."""
from diffexp.nets.autoencoder import AutoencoderKL, DiagonalGaussian
from diffexp.nets.contract import Denoiser
from diffexp.nets.dit import DiT
from diffexp.nets.unet import UNet

__all__ = ["AutoencoderKL", "Denoiser", "DiT", "DiagonalGaussian", "UNet"]
