"""Guidance at sampling time behind one interface (layer 1, pure torch).

A guider turns the net's predictions under the condition (and under the null condition, or from a second, weaker
model) into the one prediction a sampler steps with. Samplers never know which guider runs: they call the guided
model function as they call a plain one. It returns either a raw prediction of the model's type (:class:`CFG`,
:class:`IntervalCFG`: linear in the net's outputs) or the pair (x0, eps) itself (:class:`APG`, :class:`CFGPlusPlus`,
:class:`AutoGuidance`), which the sampler's denoiser takes as it is.

- :class:`CFG`: classifier-free guidance (Ho & Salimans 2022), D = D_u + w (D_c - D_u), optional rescale
  (Lin et al. 2023).
- :class:`IntervalCFG`: CFG only for noise levels sigma in [sigma_lo, sigma_hi] (Kynkaanniemi et al. 2024), the
  conditional prediction alone elsewhere (one net pass there); sigma is Karras et al.'s sigma_t / alpha_t, so the
  interval means the same noise level on every path.
- :class:`APG`: adaptive projected guidance (Sadat et al. 2024) on the denoised x0.
- :class:`CFGPlusPlus`: CFG++ (Chung et al. 2024): x0 guided with lambda in [0, 1], the *unconditional* eps kept
  for the renoising; exact for samplers that step from the pair (x0, eps) (``Sampler.steps_from_pair``).
- :class:`AutoGuidance`: guidance by a weaker model of the same task (Karras et al. 2024),
  D = D_guide + w (D_main - D_guide), both conditional.

Every guided model function counts the net's forward passes per item in ``passes`` (CFG: 2 per evaluation, batched
into one call; 1 where only the conditional pass runs), the honest NFE of a guided sampler.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from diffexp.diffusion import to_x0_eps

__all__ = ["Guider", "CFG", "IntervalCFG", "APG", "CFGPlusPlus", "AutoGuidance", "GUIDERS", "GuidedModel"]


def _number(name: str, value, minimum: float | None = None, maximum: float | None = None,
            allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return float(value)


class GuidedModel:
    """(x_t, t) -> the guided prediction; ``passes`` counts the net's forward passes per item so far."""

    def __init__(self, fn: Callable):
        self.fn, self.passes = fn, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        out, passes = self.fn(x, t)
        self.passes += passes
        return out


class Guider:
    """The interface: :meth:`bind` a net function and the condition arguments to get a :class:`GuidedModel`.

    ``scale`` None means the model's own default (filled in by :meth:`with_defaults`). ``needs_guide``: the
    guider uses a second model (``guide_fn`` in :meth:`bind`); ``needs_pair_sampler``: it is exact only with a
    sampler that steps from (x0, eps) alone.
    """

    name = "guider"
    needs_guide = False
    needs_pair_sampler = False
    scale_name = "guider.scale"

    def __init__(self, scale: float | None = None):
        self.scale = _number(self.scale_name, scale, minimum=0, allow_none=True)

    def with_defaults(self, scale: float, rescale: float = 0.0) -> "Guider":
        """This guider with the model's defaults where its own options are None (a copy; the original is
        unchanged): ``scale`` (and CFG's ``rescale``)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        if copy.scale is None:
            copy.scale = _number(self.scale_name, scale, minimum=0)
        return copy

    def bind(self, net_fn: Callable, cond: dict, uncond: dict, path, prediction_type: str,
             guide_fn: Callable | None = None, guide_cond: dict | None = None) -> GuidedModel:
        """``net_fn(x, t, **cond)`` -> raw prediction of ``prediction_type`` on ``path``; ``cond`` and ``uncond``
        the net's condition arguments for the batch (``uncond``: the null condition)."""
        if self.scale is None or getattr(self, "rescale", 0.0) is None:
            raise ValueError(f"{self.name}: options left to the model's defaults (None); fill them with "
                             f"with_defaults(scale, rescale) or set {self.scale_name}=")
        if set(cond) != set(uncond):
            raise ValueError(f"conditional and unconditional inputs differ in keys: {sorted(cond)} vs {sorted(uncond)}")
        return GuidedModel(self.combine_fn(net_fn, cond, uncond, path, prediction_type, guide_fn, guide_cond))

    def combine_fn(self, net_fn, cond, uncond, path, prediction_type, guide_fn, guide_cond):
        raise NotImplementedError

    @staticmethod
    def both(net_fn: Callable, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict):
        """(conditional, unconditional) raw predictions from one batched call."""
        joint = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        return net_fn(torch.cat([x, x]), torch.cat([t, t]), **joint).chunk(2)

    @staticmethod
    def pair(prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path, prediction_type: str):
        """(x0, eps) of a raw prediction at (x, t) on ``path``."""
        alpha, sigma = path.coefficients(t, x)
        return to_x0_eps(prediction, x, alpha, sigma, prediction_type, path.variance_preserving)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "guide_model")
        return f"{type(self).__name__}({options})"


def cfg_combine(cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """u + s (c - u); with ``rescale`` = phi: phi * pred * std(c) / std(pred) + (1 - phi) * pred (Lin et al. 2023,
    eq. 15-16, the std per item)."""
    pred = uncond_out + scale * (cond_out - uncond_out)
    if rescale > 0:
        dims = list(range(1, pred.ndim))
        ratio = cond_out.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True).clamp(min=1e-8)
        pred = rescale * pred * ratio + (1 - rescale) * pred
    return pred


class CFG(Guider):
    """Classifier-free guidance on the raw prediction: u + s (c - u), the two passes batched into one call; with
    s = 1 only the conditional pass runs. ``rescale`` = phi as :func:`cfg_combine`."""

    name = "cfg"

    def __init__(self, scale: float | None = None, rescale: float | None = 0.0):
        super().__init__(scale)
        self.rescale = _number("guider.rescale (guidance_rescale)", rescale, 0, 1, allow_none=True)

    def with_defaults(self, scale, rescale=0.0):
        copy = super().with_defaults(scale)
        if copy.rescale is None:
            copy.rescale = _number("guidance_rescale", rescale, 0, 1)
        return copy

    def combine_fn(self, net_fn, cond, uncond, path, prediction_type, guide_fn, guide_cond):
        scale, rescale = self.scale, self.rescale

        def fn(x, t):
            if scale == 1.0:
                return net_fn(x, t, **cond), 1
            c, u = self.both(net_fn, x, t, cond, uncond)
            return cfg_combine(c, u, scale, rescale), 2

        return fn


class IntervalCFG(CFG):
    """CFG where Karras sigma = sigma_t / alpha_t lies in [sigma_lo, sigma_hi], the conditional prediction alone
    elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample and distribution
    quality"; their EDM2-S ImageNet-512 interval is (0.28, 5.42]). Items of one batch at different times are
    guided each by its own time."""

    name = "interval"

    def __init__(self, scale: float | None = None, sigma_lo: float = 0.28, sigma_hi: float = 5.42,
                 rescale: float | None = 0.0):
        super().__init__(scale, rescale)
        self.sigma_lo = _number("guider.sigma_lo", sigma_lo, minimum=0)
        self.sigma_hi = _number("guider.sigma_hi", sigma_hi, minimum=0) if not (
            isinstance(sigma_hi, float) and math.isinf(sigma_hi)) else math.inf
        if self.sigma_lo >= self.sigma_hi:
            raise ValueError(f"guider.sigma_lo must be below guider.sigma_hi, got {self.sigma_lo} and {self.sigma_hi}")

    def inside(self, x: torch.Tensor, t: torch.Tensor, path) -> torch.Tensor:
        """(N,) bool: whether each item's noise level lies in the interval."""
        alpha, sigma = path.coefficients(t, x)
        ve = torch.where(alpha > 0, sigma / alpha.clamp(min=1e-30), torch.full_like(sigma, math.inf)).reshape(-1)
        ve = ve.expand(len(x)) if ve.numel() == 1 else ve
        return (ve >= self.sigma_lo) & (ve <= self.sigma_hi)

    def combine_fn(self, net_fn, cond, uncond, path, prediction_type, guide_fn, guide_cond):
        scale, rescale = self.scale, self.rescale

        def fn(x, t):
            inside = self.inside(x, t, path)
            if scale == 1.0 or not bool(inside.any()):
                return net_fn(x, t, **cond), 1
            c, u = self.both(net_fn, x, t, cond, uncond)
            guided = cfg_combine(c, u, scale, rescale)
            if bool(inside.all()):
                return guided, 2
            return torch.where(inside.reshape(-1, *([1] * (x.ndim - 1))), guided, c), 2

        return fn


class APG(Guider):
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation and artifacts of high guidance
    scales in diffusion models"), on the denoised x0 of each item:

        diff = x0_c - x0_u;  with momentum beta: m <- diff + beta m, diff <- m (over the model's evaluations)
        diff <- diff * min(1, r / ||diff||)                         (norm_threshold r; 0: off)
        diff = diff_par + diff_orth  (parallel / orthogonal to x0_c)
        x0 = x0_c + (w - 1) (diff_orth + eta diff_par)

    with eta = 1, beta = 0, r = 0 this is CFG on x0. The returned eps is the one consistent with x0 at x_t.
    Defaults: eta = 0 and beta = -0.5, the paper's; r depends on the image size (the paper's values 2.5-15 are
    for 64x64x4 latents and up), so 0 (off) unless set.
    """

    name = "apg"

    def __init__(self, scale: float | None = None, eta: float = 0.0, norm_threshold: float = 0.0,
                 momentum: float = -0.5):
        super().__init__(scale)
        self.eta = _number("guider.eta", eta)
        self.norm_threshold = _number("guider.norm_threshold", norm_threshold, minimum=0)
        self.momentum = _number("guider.momentum", momentum, minimum=-1, maximum=1)

    def guide_x0(self, x0_c: torch.Tensor, x0_u: torch.Tensor, state: dict) -> torch.Tensor:
        """The guided x0 (the formula above), ``state`` carrying the momentum average between evaluations."""
        dims = list(range(1, x0_c.ndim))
        diff = (x0_c - x0_u).double()
        if self.momentum != 0:
            average = state.get("average")
            diff = diff if average is None or average.shape != diff.shape else diff + self.momentum * average
            state["average"] = diff
        if self.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.clamp(self.norm_threshold / norm.clamp(min=1e-30), max=1.0)
        unit = x0_c.double()
        unit = unit / unit.norm(p=2, dim=dims, keepdim=True).clamp(min=1e-12)
        parallel = (diff * unit).sum(dim=dims, keepdim=True) * unit
        update = (diff - parallel) + self.eta * parallel
        return (x0_c.double() + (self.scale - 1.0) * update).to(x0_c.dtype)

    def combine_fn(self, net_fn, cond, uncond, path, prediction_type, guide_fn, guide_cond):
        state: dict = {}

        def fn(x, t):
            if self.scale == 1.0:  # x0 = x0_c whatever the update: the conditional pass alone
                return net_fn(x, t, **cond), 1
            c, u = self.both(net_fn, x, t, cond, uncond)
            (x0_c, eps_c), (x0_u, _) = self.pair(c, x, t, path, prediction_type), self.pair(u, x, t, path, prediction_type)
            x0 = self.guide_x0(x0_c, x0_u, state)
            alpha, sigma = path.coefficients(t, x)
            return (x0, eps_c - (alpha / sigma) * (x0 - x0_c)), 2

        return fn


class CFGPlusPlus(Guider):
    """CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained classifier free guidance for diffusion models"): the
    pair (x0_u + lambda (x0_c - x0_u), eps_u), the unconditional noise kept for renoising. With a sampler stepping
    x' = alpha' x0 + sigma' eps (DDIM: the paper's Algorithm 1; Euler and Euler-ancestral in the same form) on the
    path's own alpha and sigma, this is CFG++ on every path, flow included. lambda in [0, 1] (the paper's range;
    lambda = 0 is the unconditional model, lambda = 1 the conditional one)."""

    name = "cfgpp"
    needs_pair_sampler = True
    scale_name = "guider.scale (CFG++'s lambda)"

    def __init__(self, scale: float | None = 0.6):
        super().__init__(scale)
        if self.scale is not None and self.scale > 1:
            raise ValueError(f"{self.scale_name} must be in [0, 1], got {scale!r}")

    def with_defaults(self, scale, rescale=0.0):
        if self.scale is None:
            raise ValueError(f"guider=cfgpp needs its own {self.scale_name} in [0, 1] (CFG's scale does not carry "
                             f"over), e.g. guider.scale=0.6")
        return self

    def combine_fn(self, net_fn, cond, uncond, path, prediction_type, guide_fn, guide_cond):
        lam = self.scale

        def fn(x, t):
            c, u = self.both(net_fn, x, t, cond, uncond)
            (x0_c, _), (x0_u, eps_u) = self.pair(c, x, t, path, prediction_type), self.pair(u, x, t, path, prediction_type)
            return (x0_u + lam * (x0_c - x0_u), eps_u), 2

        return fn


class AutoGuidance(Guider):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
    (x0, eps) = guide + w (main - guide), both models conditional (or both unconditional: it guides unconditional
    models too). ``guide_ckpt``: the weaker model (fewer training steps or a smaller net, the same path, data space
    and conditioning), loaded and checked by the caller. Two net passes per evaluation (two nets: not batched)."""

    name = "auto"
    needs_guide = True

    def __init__(self, scale: float | None = None, guide_ckpt: str | None = None):
        super().__init__(scale)
        self.guide_ckpt = None if guide_ckpt is None else str(guide_ckpt)

    def bind(self, net_fn, cond, uncond, path, prediction_type, guide_fn=None, guide_cond=None):
        if guide_fn is None:
            raise ValueError("guider=auto needs its guide model: guider.guide_ckpt=CKPT (a weaker version of this model, "
                             "e.g. the same preset trained for a quarter of the steps)")
        return super().bind(net_fn, cond, uncond, path, prediction_type, guide_fn, guide_cond)

    def combine_fn(self, net_fn, cond, uncond, path, prediction_type, guide_fn, guide_cond):
        scale = self.scale
        guide_prediction = getattr(guide_fn, "prediction_type", prediction_type)

        def fn(x, t):
            x0_m, eps_m = self.pair(net_fn(x, t, **cond), x, t, path, prediction_type)
            x0_g, eps_g = self.pair(guide_fn(x, t, **(guide_cond or {})), x, t, path, guide_prediction)
            return (x0_g + scale * (x0_m - x0_g), eps_g + scale * (eps_m - eps_g)), 2

        return fn


GUIDERS = {g.name: g for g in (CFG, IntervalCFG, APG, CFGPlusPlus, AutoGuidance)}
