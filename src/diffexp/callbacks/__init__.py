"""Lightning callbacks: EMA of weights, image grids drawn by the module, FID/KID during training."""
from diffexp.callbacks.ema import EMA, ema_state_from_checkpoint, ema_weights
from diffexp.callbacks.fid import FIDCallback
from diffexp.callbacks.guard import DivergenceError, DivergenceGuard
from diffexp.callbacks.throughput import Throughput
from diffexp.callbacks.images import DenoisingGrid, ImageLogger, PeriodicCallback, SampleGrid, log_images

__all__ = ["DenoisingGrid", "DivergenceError", "DivergenceGuard", "EMA", "ema_state_from_checkpoint", "ema_weights", "FIDCallback", "ImageLogger",
           "PeriodicCallback", "SampleGrid", "Throughput", "log_images"]
