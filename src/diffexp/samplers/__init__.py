"""Samplers: the reverse process as small, model-agnostic classes on any Gaussian path (pure torch).

>>> sampler = get_sampler("ddim", path, steps=50)          # path: a diffexp.paths path (or a NoiseSchedule)
>>> x0 = sampler.sample(model_fn, shape=(16, 1, 16, 16), generator=torch.Generator().manual_seed(0))
"""
from diffexp.registry import Registry
from diffexp.samplers.base import Denoiser, Sampler, SpacedSampler, Trajectory, fixed_noise
from diffexp.samplers.consistency import ConsistencySampler
from diffexp.samplers.ddim import DDIMSampler
from diffexp.samplers.ddpm import DDPMSampler
from diffexp.samplers.dpm_solver import DPMSolver2M, DPMSolver2MSDE, DPMSolver3M, DPMSolverPlusPlus
from diffexp.samplers.euler import EDMSampler, EulerAncestralSampler, EulerSampler, HeunSampler
from diffexp.samplers.spacing import TIMESTEP_SPACINGS, spaced_timesteps
from diffexp.samplers.unipc import UniPCSampler

SAMPLERS = Registry("sampler")
for _name, _cls in {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmpp_2m": DPMSolver2M, "dpmpp_3m": DPMSolver3M,
                    "dpmpp_2m_sde": DPMSolver2MSDE, "unipc": UniPCSampler, "euler": EulerSampler, "heun": HeunSampler,
                    "euler_ancestral": EulerAncestralSampler, "edm": EDMSampler,
                    "consistency": ConsistencySampler}.items():
    SAMPLERS.register(_name)(_cls)


def register_sampler(name: str):
    """Class decorator: make a :class:`Sampler` subclass available as ``get_sampler(name)`` (and buildable from a
    checkpoint's stored config)."""
    return SAMPLERS.register(name)


def get_sampler(name: str, path, **kwargs) -> Sampler:
    """Build the sampler called ``name`` (one of :data:`SAMPLERS`) on ``path`` (a NoiseSchedule: its discrete path)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is not a known sampler; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](path, **kwargs)


__all__ = ["Denoiser", "Sampler", "SpacedSampler", "Trajectory", "fixed_noise", "register_sampler", "SAMPLERS",
           "get_sampler", "spaced_timesteps", "TIMESTEP_SPACINGS", "DDIMSampler", "DDPMSampler", "DPMSolverPlusPlus",
           "DPMSolver2M", "DPMSolver3M", "DPMSolver2MSDE", "UniPCSampler", "EulerSampler", "HeunSampler",
           "EulerAncestralSampler", "EDMSampler", "ConsistencySampler"]
