"""LightningModules: the only place where training meets Lightning."""
from diffexp.lit.base import TrainingModule, linear_warmup
from diffexp.lit.diffusion import DiffusionModel
from diffexp.lit.vae import VAETraining

__all__ = ["TrainingModule", "linear_warmup", "DiffusionModel", "VAETraining"]
