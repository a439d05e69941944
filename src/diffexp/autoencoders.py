"""Frozen autoencoders for latent diffusion, behind one interface (the ``vae`` config group).

Each maps images in [-1, 1] to *raw* latents and back. The scale/shift convention that turns raw
latents into the unit-variance latents diffusion works on lives here and only here:

    z = (latent - shift_factor) * scaling_factor          latent = z / scaling_factor + shift_factor

``scaling_factor`` is the published one for pretrained VAEs (SD: 0.18215, TAESD: 1.0) and ``None``
for a VAE trained here: :class:`diffexp.spaces.LatentSpace` then estimates 1/std of the
training latents once (as LDM does) and keeps it in its checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from diffexp.checkpoints import CONFIG_KEY, read_checkpoint
from diffexp.errors import MissingPackageError
from diffexp.frozen import Frozen, hub_offline
from diffexp.nets.autoencoder import AutoencoderKL
from diffexp.registry import register_part


class FrozenAutoencoder(Frozen):
    """Base class. Subclasses set ``latent_channels``, ``downsampling_factor``, ``scaling_factor``,
    ``shift_factor``, ``name`` and implement :meth:`encode_raw` / :meth:`decode_raw`."""

    latent_channels: int
    downsampling_factor: int
    scaling_factor: float | None = None
    shift_factor: float = 0.0
    name: str = "autoencoder"

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The posterior q(latent | x) = N(mean, diag(exp(logvar))) as (mean, logvar); logvar None for a
        deterministic encoder. (LDM's diagonal Gaussian, which pre-encoded latents keep so training samples it.)"""
        return self.encode_raw(images), None

    def architecture(self) -> dict | None:
        """Constructor arguments that rebuild the net when its weights travel in the checkpoint of the model
        using it (``in_checkpoint``); None for autoencoders loaded from their own files."""
        return None

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def to_diffusion(raw: torch.Tensor, scale, shift=0.0) -> torch.Tensor:
        """z = (latent - shift) * scale: raw latents to the space diffusion runs in."""
        return (raw - shift) * scale

    @torch.no_grad()
    def encode(self, images: torch.Tensor, scale: float | torch.Tensor, shift: float | torch.Tensor = 0.0,
               batch_size: int = 256) -> torch.Tensor:
        """Diffusion latents :meth:`to_diffusion` (encode_raw(x)), in batches of ``batch_size``."""
        return self.to_diffusion(torch.cat([self.encode_raw(chunk) for chunk in images.split(batch_size)]), scale, shift)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, scale: float | torch.Tensor, shift: float | torch.Tensor = 0.0,
               batch_size: int = 256) -> torch.Tensor:
        """Images decode_raw(z / scale + shift), clamped to [-1, 1]."""
        raw = z / scale + shift
        return torch.cat([self.decode_raw(chunk) for chunk in raw.split(batch_size)]).clamp(-1, 1)

    def check_image_size(self, image_size: int) -> int:
        """The latent size for ``image_size``, which must be divisible by the downsampling factor."""
        if image_size % self.downsampling_factor:
            raise ValueError(f"data.image_size={image_size} is not divisible by the VAE's downsampling factor "
                             f"{self.downsampling_factor} (vae={self.name})")
        return image_size // self.downsampling_factor


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """The :class:`AutoencoderKL` of a ``model=vae`` checkpoint, rebuilt from the config inside it."""
    checkpoint = read_checkpoint(path, "vae.ckpt")
    model_cfg = checkpoint[CONFIG_KEY].get("model", {})
    if not str(model_cfg.get("_target_", "")).endswith("VAETraining"):
        raise ValueError(f"vae.ckpt={str(path)!r} holds a {model_cfg.get('_target_')} checkpoint, not a VAE; "
                         f"train one with `python train.py model=vae` (e.g. experiment=shapes_vae)")
    net = AutoencoderKL(**architecture_of(model_cfg["net"]))
    state = {k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval()


def architecture_of(net_cfg: dict) -> dict:
    """The :class:`AutoencoderKL` constructor arguments in a (resolved) ``net`` config."""
    return {k: v for k, v in dict(net_cfg).items() if k != "_target_"}


@register_part
class OwnAutoencoder(FrozenAutoencoder):
    """A :class:`diffexp.nets.AutoencoderKL` trained here with ``python train.py model=vae`` (``ckpt``),
    or given as a module (``net``), or built from its constructor arguments (``architecture``) with the
    weights to come from a latent-diffusion checkpoint, which carries them (``in_checkpoint``).

    Latents are the posterior mean (with LDM's KL weight 1e-6 the posterior std is tiny).
    """

    in_checkpoint = True  # under 1M parameters: latent checkpoints carry it and need no VAE file

    def __init__(self, ckpt: str | None = None, scaling_factor: float | None = None, net=None,
                 architecture: dict | None = None):
        super().__init__()
        if sum(x is not None for x in (ckpt, net, architecture)) != 1:
            raise ValueError("vae=own needs vae.ckpt=PATH, a checkpoint written by `python train.py model=vae ...` "
                             "(e.g. experiment=shapes_vae)")
        if ckpt is not None:
            self.net = load_autoencoder(ckpt)
        else:
            self.net = net if net is not None else AutoencoderKL(**dict(architecture))
        self.latent_channels = self.net.latent_channels
        self.downsampling_factor = self.net.downsampling_factor
        self.scaling_factor, self.name = scaling_factor, f"own:{ckpt}" if ckpt else "own"
        self.freeze()

    def architecture(self) -> dict:
        """Constructor arguments of the net (written into the run config, so a checkpoint can rebuild it)."""
        return dict(self.net.config)

    def encode_raw(self, images):
        return self.net.encode(images).mode()

    def encode_moments(self, images):
        posterior = self.net.encode(images)
        return posterior.mean, posterior.logvar

    def decode_raw(self, latents):
        return self.net.decode(latents)


@register_part
class DiffusersAutoencoder(FrozenAutoencoder):
    """diffusers' ``AutoencoderKL`` (e.g. ``stabilityai/sd-vae-ft-mse``) or ``AutoencoderTiny``
    (``madebyollin/taesd``) from a hub id, the HF cache or a local folder, or built from a config
    dict with random weights (``config=...``; tests and shape checks).

    ``scaling_factor``/``shift_factor`` default to the model config's published values.
    """

    KINDS = ("kl", "tiny")

    def __init__(self, kind: str = "kl", name_or_path: str | None = None, config: dict | None = None,
                 subfolder: str | None = None, scaling_factor: float | None = None,
                 shift_factor: float | None = None, local_files_only: bool | None = None):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"vae.kind={kind!r}; allowed: {list(self.KINDS)}")
        try:
            import diffusers
        except ImportError:
            raise MissingPackageError("pretrained VAEs need diffusers: pip install 'diffexp[vae]' (or pip install diffusers)") from None
        model_cls = diffusers.AutoencoderKL if kind == "kl" else diffusers.AutoencoderTiny
        if (name_or_path is None) == (config is None):
            raise ValueError("give exactly one of vae.name_or_path (hub id or folder) and vae.config (random weights)")
        if config is not None:
            self.model = model_cls(**dict(config))
            name = f"{kind}:random"
        else:
            if local_files_only is None:
                local_files_only = hub_offline()
            try:
                self.model = model_cls.from_pretrained(name_or_path, subfolder=subfolder, use_safetensors=True,
                                                       local_files_only=local_files_only)  # never pickle files
            except (OSError, ValueError) as e:
                raise FileNotFoundError(
                    f"VAE {name_or_path!r} could not be loaded ({e.__class__.__name__}). Offline, download it on a "
                    f"machine with internet (huggingface-cli download {name_or_path}) into the HF cache "
                    f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}), or set vae.name_or_path to a local "
                    f"folder holding its config.json and safetensors weights (pickled .bin weights are never loaded)"
                ) from None
            name = f"{kind}:{name_or_path}"
        cfg = self.model.config
        self.kind, self.name = kind, name
        self.latent_channels = cfg.latent_channels
        blocks = cfg.block_out_channels if kind == "kl" else cfg.encoder_block_out_channels
        self.downsampling_factor = 2 ** (len(blocks) - 1)
        published_shift = getattr(cfg, "shift_factor", None)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        self.shift_factor = float(shift_factor if shift_factor is not None else (published_shift or 0.0))
        self.freeze()

    def encode_raw(self, images):
        out = self.model.encode(images)
        return out.latent_dist.mode() if self.kind == "kl" else out.latents

    def encode_moments(self, images):
        if self.kind != "kl":
            return super().encode_moments(images)
        posterior = self.model.encode(images).latent_dist
        return posterior.mean, posterior.logvar

    def decode_raw(self, latents):
        return self.model.decode(latents).sample
