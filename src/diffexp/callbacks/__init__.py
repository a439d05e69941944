"""Lightning callbacks: EMA of weights, image grids."""
from diffexp.callbacks.ema import EMA, ema_state_from_checkpoint, ema_weights
from diffexp.callbacks.images import SampleGrid, log_images

__all__ = ["EMA", "ema_state_from_checkpoint", "ema_weights", "SampleGrid", "log_images"]
