"""Which timesteps a sampler with fewer steps than the schedule visits."""
from __future__ import annotations

import torch

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> torch.Tensor:
    """Descending integer timesteps (LongTensor of length ``steps``) in [0, T).

    - leading:  arange(steps) * (T // steps), reversed      (DDIM paper; diffusers "leading")
    - trailing: round(arange(T, 0, -T/steps)) - 1           (Lin et al. 2023; starts at T-1)
    - linspace: round(linspace(0, T-1, steps)), reversed
    (Table 2 of Lin et al. 2023 compares them.)
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"sampler.steps must be a positive integer, got {steps!r}")
    if steps > num_timesteps:
        raise ValueError(f"sampler.steps={steps} exceeds the schedule's num_timesteps={num_timesteps}")
    if spacing == "leading":
        ts = torch.arange(steps, dtype=torch.float64) * (num_timesteps // steps)
    elif spacing == "trailing":
        ts = torch.round(torch.arange(num_timesteps, 0, -num_timesteps / steps, dtype=torch.float64)).flip(0) - 1
    elif spacing == "linspace":
        ts = torch.round(torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64))
    else:
        raise ValueError(f"sampler.timestep_spacing={spacing!r}; choose one of {list(TIMESTEP_SPACINGS)}")
    return ts.long().flip(0)
