"""Lightning callbacks: EMA of weights, sample and denoising grids, FID/KID during training."""
from diffexp.callbacks.denoising import DenoisingGrid
from diffexp.callbacks.ema import EMA, ema_state_from_checkpoint, ema_weights
from diffexp.callbacks.fid import FIDCallback
from diffexp.callbacks.images import SampleGrid, log_images

__all__ = ["DenoisingGrid", "EMA", "ema_state_from_checkpoint", "ema_weights", "FIDCallback", "SampleGrid",
           "log_images"]
