"""Samplers: the reverse process as small, model-agnostic classes (pure torch).

>>> sampler = get_sampler("ddim", schedule=s, steps=50)
>>> x0 = sampler.sample(model_fn, shape=(16, 1, 16, 16), generator=torch.Generator().manual_seed(0))
"""
from diffexp.samplers.base import Denoiser, Sampler, SpacedSampler, Trajectory, fixed_noise
from diffexp.samplers.ddim import DDIMSampler
from diffexp.samplers.ddpm import DDPMSampler
from diffexp.samplers.dpm_solver import DPMSolver2M, DPMSolver2MSDE, DPMSolver3M, DPMSolverPlusPlus
from diffexp.samplers.euler import EulerAncestralSampler, EulerSampler, HeunSampler
from diffexp.samplers.spacing import TIMESTEP_SPACINGS, spaced_timesteps
from diffexp.samplers.unipc import UniPCSampler

SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler, "ddim": DDIMSampler,
    "dpmpp_2m": DPMSolver2M, "dpmpp_3m": DPMSolver3M, "dpmpp_2m_sde": DPMSolver2MSDE, "unipc": UniPCSampler,
    "euler": EulerSampler, "heun": HeunSampler, "euler_ancestral": EulerAncestralSampler,
}


def register_sampler(name: str):
    """Class decorator: make a :class:`Sampler` subclass available as ``get_sampler(name)``."""

    def add(cls: type[Sampler]) -> type[Sampler]:
        SAMPLERS[name] = cls
        return cls

    return add


def get_sampler(name: str, schedule, **kwargs) -> Sampler:
    """Build the sampler called ``name`` (one of :data:`SAMPLERS`) for ``schedule``."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is not a known sampler; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](schedule, **kwargs)


__all__ = ["Denoiser", "Sampler", "SpacedSampler", "Trajectory", "fixed_noise", "register_sampler", "SAMPLERS",
           "get_sampler", "spaced_timesteps", "TIMESTEP_SPACINGS", "DDIMSampler", "DDPMSampler", "DPMSolverPlusPlus",
           "DPMSolver2M", "DPMSolver3M", "DPMSolver2MSDE", "UniPCSampler", "EulerSampler", "HeunSampler",
           "EulerAncestralSampler"]
