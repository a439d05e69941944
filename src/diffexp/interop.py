"""diffusers interoperability: diffexp's pixel U-Net <-> diffusers' ``UNet2DModel``, export and import.

``python -m diffexp.export ckpt=PATH out=DIR`` writes a folder ``DDPMPipeline.from_pretrained(DIR)`` and
``DDIMPipeline.from_pretrained(DIR)`` load: ``unet/`` (``UNet2DModel`` config + safetensors weights, EMA by
default) and ``scheduler/``: for a DDPM path the training schedule's betas exactly, as ``trained_betas``, and the
prediction type (``DDPMScheduler``); for a flow-matching model a ``FlowMatchEulerDiscreteScheduler``. Paths and
predictions a ``DDPMPipeline`` cannot run (EDM's preconditioning, the continuous cosine path) are refused with the
reason. ``net.init_from=DIR_OR_HUB_ID`` is the inverse: a ``UNet2DModel``'s weights in the matching diffexp U-Net,
its conventions (time-embedding order and frequency shift, downsampling padding) taken from its config.

The map is one-to-one because both networks are the DDPM U-Net (Ho et al. 2020): the same residual blocks
(GroupNorm-SiLU-conv, time projection added or as scale-shift), single-block self-attention (diffexp's fused
``qkv`` is diffusers' ``to_q``/``to_k``/``to_v`` stacked), nearest-neighbour upsampling and stride-2 downsampling.
What has no counterpart is refused with :class:`InteropError` naming the option.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from diffexp.diffusion import check_prediction_type
from diffexp.paths import DiscretePath, FlowPath
from diffexp.nets.layers import AttentionBlock, Downsample, ResBlock, Upsample
from diffexp.nets.unet import UNet

RESBLOCK_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
                  "conv2": "conv2", "skip": "conv_shortcut"}
NORM_EPS = 1e-6
GROUPS = 32


class InteropError(ValueError):
    """A model or a diffusers config that has no counterpart on the other side."""


def _attention_levels(net: UNet) -> list[int]:
    resolutions = [net.image_size // 2**i for i in range(len(net.channel_mult))]
    return [lv for lv, r in enumerate(resolutions) if r in net.attention_resolutions]


def diffusers_unet_config(net: UNet) -> dict:
    """The ``UNet2DModel`` keyword arguments of a network with ``net``'s function (its weights mapped by
    :func:`to_diffusers_state`); :class:`InteropError` where ``net`` has no ``UNet2DModel`` counterpart."""
    if not isinstance(net, UNet):
        raise InteropError(f"only diffexp's UNet maps onto diffusers' UNet2DModel, not {type(net).__name__}")
    if net.context_dim:
        raise InteropError("a text-conditioned U-Net (net.context_dim set: cross-attention transformer blocks) has no "
                           "UNet2DModel counterpart; diffusers' UNet2DConditionModel uses other blocks, so export "
                           "supports unconditional pixel models only")
    if net.num_classes:
        raise InteropError("a class-conditional U-Net (net.num_classes) is not exported: diffusers' DDPMPipeline "
                           "and DDIMPipeline cannot pass class labels; export supports unconditional pixel models")
    if net.channel_mult[0] != 1:
        raise InteropError(f"net.channel_mult={list(net.channel_mult)} starts at {net.channel_mult[0]}: UNet2DModel's "
                           f"time embedding has the width of the first level, diffexp's that of base_channels; "
                           f"they agree only when channel_mult starts at 1")
    norms = {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    if norms != {GROUPS}:
        raise InteropError(f"UNet2DModel uses one GroupNorm group count for every layer; this U-Net's widths give "
                           f"{sorted(norms)} groups (every width must be a multiple of {GROUPS}: raise "
                           f"net.base_channels)")
    widths = [net.base_channels * m for m in net.channel_mult]
    levels = _attention_levels(net)
    if net.num_heads == 1:
        head_dim = None  # every attention layer one head of its full width, as UNet2DModel's default
    else:
        dims = {widths[lv] // net.num_heads for lv in levels + [len(widths) - 1]}
        if len(dims) > 1:
            raise InteropError(f"UNet2DModel gives every attention layer the same head width; net.num_heads="
                               f"{net.num_heads} gives {sorted(dims)} at this U-Net's attention levels")
        head_dim = dims.pop()
    return {
        "sample_size": net.image_size, "in_channels": net.in_channels, "out_channels": net.out_channels,
        "center_input_sample": False, "time_embedding_type": "positional",
        "flip_sin_to_cos": net.time_embedding_order == "cos_sin", "freq_shift": net.time_freq_shift,
        "down_block_types": ["AttnDownBlock2D" if lv in levels else "DownBlock2D" for lv in range(len(widths))],
        "up_block_types": ["AttnUpBlock2D" if lv in levels else "UpBlock2D" for lv in reversed(range(len(widths)))],
        "block_out_channels": widths, "layers_per_block": net.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": net.downsample_padding, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": _dropout(net), "act_fn": "silu", "attention_head_dim": head_dim, "norm_num_groups": GROUPS,
        "attn_norm_num_groups": GROUPS, "norm_eps": NORM_EPS,
        "resnet_time_scale_shift": "scale_shift" if net.scale_shift else "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": None,
    }


def _dropout(net: UNet) -> float:
    rates = {m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)}
    return rates.pop() if rates else 0.0


def _path_pairs(blocks, ours: str, theirs: str, levels: int, per_level: int, resample: str):
    """(diffexp prefix, diffusers prefix, module) along one path of the U (``down`` or ``up``): ``per_level`` blocks
    (a residual block, maybe attention) per level, then a resampler between levels."""
    pairs, index = [], 0
    for level in range(levels):
        for j in range(per_level):
            for k, layer in enumerate(blocks[index]):
                kind = "resnets" if isinstance(layer, ResBlock) else "attentions"
                pairs.append((f"{ours}.{index}.{k}", f"{theirs}.{level}.{kind}.{j}", layer))
            index += 1
        if level < levels - 1:
            pairs.append((f"{ours}.{index}.0", f"{theirs}.{level}.{resample}.0", blocks[index][0]))
            index += 1
    return pairs


def _module_pairs(net: UNet) -> list[tuple[str, str, torch.nn.Module]]:
    """(diffexp prefix, diffusers prefix, diffexp module) for every block, in diffusers' block order (its up
    blocks count from the lowest resolution, as diffexp's ``up`` list does)."""
    pairs = [("time_mlp.0", "time_embedding.linear_1", None), ("time_mlp.2", "time_embedding.linear_2", None),
             ("conv_in", "conv_in", None), ("norm_out", "conv_norm_out", None), ("conv_out", "conv_out", None)]
    levels, per_level = len(net.channel_mult), net.num_res_blocks
    pairs += _path_pairs(net.down, "down", "down_blocks", levels, per_level, "downsamplers")
    pairs += [(f"mid.{k}", f"mid_block.{name}", net.mid[k]) for k, name in enumerate(["resnets.0", "attentions.0",
                                                                                     "resnets.1"])]
    pairs += _path_pairs(net.up, "up", "up_blocks", levels, per_level + 1, "upsamplers")
    return pairs


def _param_names(layer) -> list[tuple[str, str]]:
    """(diffexp name, diffusers name) of one block's parameters, relative to the block; attention's fused ``qkv``
    is handled by the callers."""
    if isinstance(layer, ResBlock):
        return [(f"{ours}.{p}", f"{theirs}.{p}") for ours, theirs in RESBLOCK_NAMES.items()
                for p in ("weight", "bias") if not (ours == "skip" and isinstance(layer.skip, torch.nn.Identity))
                and not (ours == "temb_proj" and layer.temb_proj is None)]
    if isinstance(layer, AttentionBlock):
        return [("norm.weight", "group_norm.weight"), ("norm.bias", "group_norm.bias"),
                ("proj.weight", "to_out.0.weight"), ("proj.bias", "to_out.0.bias")]
    if isinstance(layer, (Downsample, Upsample)):
        return [("conv.weight", "conv.weight"), ("conv.bias", "conv.bias")]
    return [("weight", "weight"), ("bias", "bias")]


def plain_state(net: UNet) -> dict[str, torch.Tensor]:
    """``net``'s state dict under its plain names: LoRA adapters (:mod:`diffexp.lora`) merged into their base
    weights first, adapter tensors dropped."""
    from diffexp.lora import base_key, is_adapter_key, lora_layers, merge_lora

    if not lora_layers(net):
        return net.state_dict()
    net = copy.deepcopy(net)
    merge_lora(net)
    return {base_key(k): v for k, v in net.state_dict().items() if not is_adapter_key(k)}


def to_diffusers_state(net: UNet, state: dict | None = None) -> dict[str, torch.Tensor]:
    """``net``'s weights (or ``state``, a state dict of ``net``; LoRA adapters merged) under ``UNet2DModel``'s
    parameter names."""
    diffusers_unet_config(net)
    state = dict(plain_state(net) if state is None else state)
    out = {}
    for ours, theirs, layer in _module_pairs(net):
        for o, t in _param_names(layer):
            out[f"{theirs}.{t}"] = state.pop(f"{ours}.{o}")
        if isinstance(layer, AttentionBlock):
            for p in ("weight", "bias"):
                q, k, v = state.pop(f"{ours}.qkv.{p}").chunk(3, dim=0)
                out.update({f"{theirs}.to_q.{p}": q, f"{theirs}.to_k.{p}": k, f"{theirs}.to_v.{p}": v})
    if state:
        raise InteropError(f"U-Net weights without a UNet2DModel counterpart: {sorted(state)[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


def from_diffusers_state(net: UNet, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``UNet2DModel`` state dict under ``net``'s parameter names (the inverse of :func:`to_diffusers_state`);
    :class:`InteropError` naming the weights that are missing or left over."""
    state = dict(state)
    out, missing = {}, []
    for ours, theirs, layer in _module_pairs(net):
        names = list(_param_names(layer))
        for o, t in names:
            if f"{theirs}.{t}" in state:
                out[f"{ours}.{o}"] = state.pop(f"{theirs}.{t}")
            else:
                missing.append(f"{theirs}.{t}")
        if isinstance(layer, AttentionBlock):
            for p in ("weight", "bias"):
                parts = [state.pop(f"{theirs}.to_{x}.{p}", None) for x in "qkv"]
                if any(part is None for part in parts):
                    missing.append(f"{theirs}.to_q/k/v.{p}")
                else:
                    out[f"{ours}.qkv.{p}"] = torch.cat(parts, dim=0)
    if missing or state:
        raise InteropError(f"the UNet2DModel weights do not match this U-Net: missing {missing[:4]}, left over "
                           f"{sorted(state)[:4]}")
    shapes = net.state_dict()
    wrong = [k for k, v in out.items() if k in shapes and shapes[k].shape != v.shape]
    if wrong:
        raise InteropError(f"the UNet2DModel weights have other shapes than this U-Net: {wrong[0]} is "
                           f"{tuple(out[wrong[0]].shape)} there, {tuple(shapes[wrong[0]].shape)} here")
    return out


# diffusers config key -> (allowed value(s), what diffexp supports instead)
FIXED_CONVENTIONS = {
    "time_embedding_type": ("positional", "sinusoidal positional time embeddings"),
    "center_input_sample": (False, "inputs used as they are"),
    "act_fn": ("silu", "SiLU activations"),
    "mid_block_scale_factor": (1, "unscaled middle residual blocks"),
    "norm_eps": (NORM_EPS, "GroupNorm eps 1e-6"),
    "norm_num_groups": (GROUPS, "32 GroupNorm groups"),
    "downsample_type": ("conv", "strided-convolution downsampling"),
    "upsample_type": ("conv", "nearest-neighbour upsampling with a convolution"),
    "class_embed_type": (None, "no class embedding type"),
    "num_class_embeds": (None, "unconditional U-Nets"),
    "add_attention": (True, "self-attention in the middle block"),
    "time_embedding_dim": (None, "a time embedding 4x the first width"),
}


def unet_options_from_diffusers(config: dict) -> dict:
    """diffexp ``UNet`` keyword arguments (without image size and channels) for a ``UNet2DModel`` config;
    :class:`InteropError` naming each convention diffexp cannot represent."""
    problems = []
    for key, (allowed, supported) in FIXED_CONVENTIONS.items():
        if key == "time_embedding_dim" and config.get(key) == 4 * (config.get("block_out_channels") or [0])[0]:
            continue
        if key in config and config[key] != allowed:
            problems.append(f"{key}={config[key]!r} (diffexp supports {supported})")
    attn_groups = config.get("attn_norm_num_groups")
    if attn_groups not in (None, GROUPS):
        problems.append(f"attn_norm_num_groups={attn_groups!r} (diffexp supports {GROUPS})")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        problems.append(f"resnet_time_scale_shift={shift!r} (diffexp supports default and scale_shift)")
    elif shift == "scale_shift" and attn_groups is None:
        problems.append("resnet_time_scale_shift='scale_shift' with attn_norm_num_groups=None (a middle attention "
                        "without GroupNorm; diffexp normalises it)")
    if config.get("downsample_padding", 1) not in (0, 1):
        problems.append(f"downsample_padding={config['downsample_padding']!r} (diffexp supports 0 and 1)")
    down, up = list(config.get("down_block_types", [])), list(config.get("up_block_types", []))
    widths = list(config.get("block_out_channels", []))
    allowed_blocks = {"DownBlock2D", "AttnDownBlock2D"}
    if not down or set(down) - allowed_blocks or set(up) - {"UpBlock2D", "AttnUpBlock2D"}:
        problems.append(f"down_block_types={down}, up_block_types={up} (diffexp supports DownBlock2D/AttnDownBlock2D "
                        f"and UpBlock2D/AttnUpBlock2D)")
    levels = [i for i, b in enumerate(down) if b.startswith("Attn")]
    if not problems and [i for i, b in enumerate(reversed(up)) if b.startswith("Attn")] != levels:
        problems.append(f"attention at levels {levels} down but not the same levels up ({up})")
    if widths and widths[0] and any(w % widths[0] for w in widths):
        problems.append(f"block_out_channels={widths} (diffexp's widths are multiples of the first)")
    if len(widths) != len(down):
        problems.append(f"block_out_channels={widths} for {len(down)} down blocks")
    head_dim = config.get("attention_head_dim")
    heads = 1
    if head_dim is not None and not problems:
        counts = {widths[lv] / head_dim for lv in levels + [len(widths) - 1]}
        if len(counts) > 1 or not float(counts.copy().pop()).is_integer():
            problems.append(f"attention_head_dim={head_dim} with widths {widths} (diffexp uses one head count)")
        else:
            heads = int(counts.pop())
    if problems:
        raise InteropError("this UNet2DModel has conventions diffexp's U-Net cannot represent: " + "; ".join(problems))
    sample_size = config.get("sample_size")
    size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return {
        "base_channels": widths[0], "channel_mult": [w // widths[0] for w in widths],
        "num_res_blocks": config.get("layers_per_block", 2), "num_heads": heads,
        "attention_resolutions": [size // 2**lv for lv in levels] if size else [], "attention_levels": None,
        "attention_level_indices": levels, "dropout": config.get("dropout", 0.0),
        "scale_shift": shift == "scale_shift",
        "time_embedding_order": "cos_sin" if config.get("flip_sin_to_cos", True) else "sin_cos",
        "time_freq_shift": float(config.get("freq_shift", 0)), "downsample_padding": config.get("downsample_padding", 1),
        "in_channels": config.get("in_channels", 3), "out_channels": config.get("out_channels", 3),
        "image_size": size,
    }


def diffusers_source(source, pipeline_subfolder: str, model_class: str, example_id: str) -> tuple[str, str | None]:
    """(source, subfolder) for ``from_pretrained`` of ``net.init_from=SOURCE``: a model folder (config.json), a
    pipeline folder (``pipeline_subfolder``/config.json) or a hub id ``owner/name``; anything else is an error
    naming what is allowed. A hub id's subfolder is left to the caller."""
    local = Path(str(source)).expanduser()
    if local.is_dir():
        if (local / pipeline_subfolder / "config.json").is_file():
            return str(local), pipeline_subfolder
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"net.init_from={str(source)!r} is a folder without config.json or "
                                    f"{pipeline_subfolder}/config.json; pass a diffusers {model_class} folder, a "
                                    f"pipeline folder or a hub id")
        return str(local), None
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"net.init_from={str(source)!r} is neither a folder nor a hub id like {example_id}")
    return str(source), None


def read_diffusers_unet(source: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of the ``UNet2DModel`` at ``source``: a local folder (a pipeline folder with ``unet/``,
    or the U-Net's own folder with config.json) or a hub id (downloaded when online, else from the HF cache).
    Loaded by diffusers (safetensors, or .bin read with weights_only)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise InteropError("net.init_from needs diffusers: pip install -e '.[diffusers]'") from None
    local = Path(source).expanduser()
    source, subfolder = diffusers_source(source, "unet", "UNet2DModel", "google/ddpm-cifar10-32")
    def reason(error) -> str:
        return " ".join(str(error).split())[:240]

    try:
        unet = UNet2DModel.from_pretrained(source, subfolder=subfolder)
    except (OSError, EnvironmentError) as e:
        if subfolder is None and not local.is_dir():
            try:  # pipeline repositories keep the U-Net in unet/
                unet = UNet2DModel.from_pretrained(source, subfolder="unet")
            except (OSError, EnvironmentError):
                raise InteropError(f"net.init_from={str(source)!r}: there is no such local folder, and no hub model "
                                   f"of that id could be loaded ({reason(e)}); offline, download it once or pass a "
                                   f"local folder") from None
        else:
            raise InteropError(f"net.init_from={str(source)!r}: no UNet2DModel could be loaded ({reason(e)})") from None
    return dict(unet.config), {k: v.detach().float() for k, v in unet.state_dict().items()}


def check_unet_matches(unet_cfg, options: dict, source: str) -> None:
    """:class:`InteropError` naming each diffexp ``net.`` option whose value differs from what the diffusers
    U-Net at ``source`` needs (the layout; conventions are set by the caller)."""
    levels = options["attention_level_indices"]
    resolutions = [unet_cfg.image_size // 2**i for i in range(len(options["channel_mult"]))]
    ours_levels = sorted({resolutions.index(r) for r in unet_cfg.get("attention_resolutions") or [] if r in resolutions}
                         | {lv % len(resolutions) for lv in unet_cfg.get("attention_levels") or []})
    wanted = {"base_channels": options["base_channels"], "channel_mult": options["channel_mult"],
              "num_res_blocks": options["num_res_blocks"], "num_heads": options["num_heads"],
              "scale_shift": options["scale_shift"], "in_channels": options["in_channels"]}
    differing = [f"net.{k}={v}" for k, v in wanted.items() if _plain(unet_cfg.get(k)) != v]
    if ours_levels != levels:
        differing.append(f"net.attention_resolutions=[] net.attention_levels={levels} (attention at these levels; "
                         f"now {ours_levels})")
    if (unet_cfg.get("out_channels") or unet_cfg.in_channels) != options["out_channels"]:
        differing.append(f"net.out_channels={options['out_channels']}")
    if differing:
        raise InteropError(f"net.init_from={source!r} is a U-Net of another layout than net= builds; set "
                           + ", ".join(differing) + " (or choose the matching net preset and data)")


def _plain(value):
    """A config list (OmegaConf's ListConfig) as a plain list, for comparison."""
    return list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, dict)) else value


def diffusers_scheduler_config(schedule, prediction_type: str) -> dict:
    """``DDPMScheduler``/``DDIMScheduler`` keyword arguments reproducing ``schedule`` (its betas exactly) and the
    prediction type, with diffexp's sampler defaults (leading timesteps, no x0 clipping, the posterior variance)."""
    betas = schedule.betas.double()
    return {"num_train_timesteps": int(betas.numel()), "beta_schedule": "linear",
            "beta_start": float(betas[0]), "beta_end": float(betas[-1]), "trained_betas": betas.tolist(),
            "prediction_type": check_prediction_type(prediction_type), "clip_sample": False, "variance_type": "fixed_small",
            "timestep_spacing": "leading", "steps_offset": 0}


EXPORT_TOLERANCE = 1e-4  # max |UNet2DModel - diffexp| on a random batch an export must meet
FLOW_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler's num_train_timesteps: the net's input is this x t


def diffusers_scheduler(model):
    """The diffusers scheduler that samples ``model`` in a ``DDPMPipeline`` (which calls ``unet(x, t)`` at the
    scheduler's timesteps and steps on its output, with no input scaling): ``DDPMScheduler`` with the exact betas
    for a DDPM path (epsilon, sample, v), ``FlowMatchEulerDiscreteScheduler`` for the flow path with the velocity
    target and the net input 1000 t; anything else is an :class:`InteropError` saying why."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    path, prediction = model.path, model.prediction_type
    if isinstance(path, DiscretePath):
        if prediction not in ("epsilon", "sample", "v_prediction"):
            raise InteropError(f"model.prediction_type={prediction}: diffusers' DDPMScheduler takes epsilon, sample or "
                               f"v_prediction outputs; a {prediction} model on a DDPM path has no DDPMPipeline form")
        return DDPMScheduler(**diffusers_scheduler_config(path.schedule, prediction))
    if isinstance(path, FlowPath):
        if prediction != "velocity":
            raise InteropError(f"a flow-path model exports with diffusers' FlowMatchEulerDiscreteScheduler, which "
                               f"steps on a velocity; this model predicts {prediction} (train with "
                               f"model.prediction_type=velocity, as formulation=flow does)")
        if path.noise_input_scale != FLOW_TIMESTEPS:
            raise InteropError(f"path.noise_input_scale={path.noise_input_scale:g}: FlowMatchEulerDiscreteScheduler "
                               f"gives the net {FLOW_TIMESTEPS} t; export needs the default scale")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=FLOW_TIMESTEPS, shift=1.0)
    if prediction == "edm":
        raise InteropError("EDM's preconditioning scales the net's input by c_in(sigma) before every call; "
                           "DDPMPipeline calls the UNet2DModel on x itself (diffusers' EDMEulerScheduler needs a "
                           "pipeline that calls scale_model_input), so an EDM model has no DDPMPipeline form")
    raise InteropError(f"path {path!r}: DDPMPipeline runs DDPM's discrete schedules and flow matching; this path has "
                       f"no diffusers scheduler that reproduces it exactly")


def export_pipeline(model, out: str | Path, overwrite: bool = False) -> float:
    """Write ``model`` (a pixel-space, unconditional :class:`~diffexp.lit.DiffusionModel`; LoRA adapters merged) as
    a diffusers ``DDPMPipeline`` folder: ``unet/`` (safetensors), ``scheduler/`` (:func:`diffusers_scheduler`),
    ``model_index.json``. The folder is
    written beside ``out``, loaded back and compared with ``model.net`` (:func:`export_difference`), then moved into
    place (replacing ``out`` only with ``overwrite``); returns that difference."""
    from diffusers import DDPMPipeline, UNet2DModel

    from diffexp.spaces import LatentSpace

    if isinstance(model.space, LatentSpace):
        raise InteropError("this is a latent diffusion model: its U-Net runs on an autoencoder's latents, and a "
                           "diffusers pipeline of a UNet2DModel runs on pixels; export supports pixel models "
                           "(model=pixel)")
    scheduler = diffusers_scheduler(model)
    config = diffusers_unet_config(model.net)
    unet = UNet2DModel(**config)
    unet.load_state_dict(to_diffusers_state(model.net), strict=True)
    out = Path(out).resolve()
    if out == Path.cwd() or out in Path.cwd().parents:
        raise ValueError(f"out={str(out)!r} is the current folder or one above it; export into a new folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out={str(out)!r} exists and is not empty; choose another folder or pass overwrite=true")
    staging = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(staging, safe_serialization=True)
        difference = export_difference(model, staging)
        if not difference <= EXPORT_TOLERANCE:
            raise InteropError(f"the exported UNet2DModel differs from this model by {difference:.2e} (> "
                               f"{EXPORT_TOLERANCE:g}) on a random batch; nothing was written to {out}")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return difference


def export_difference(model, folder: str | Path, seed: int = 0) -> float:
    """max |UNet2DModel(folder) - diffexp's net| on a random batch of 4 at the net inputs of random times."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    net = model.net.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, net.in_channels, net.image_size, net.image_size, generator=g)
    path = model.path
    if path.num_timesteps is not None:
        t = path.noise_input(torch.randint(0, path.num_timesteps, (4,), generator=g))
    else:
        t = path.noise_input(path.t_min + (path.t_max - path.t_min) * torch.rand(4, generator=g, dtype=torch.float64)).float()
    with torch.no_grad():
        return float((unet(x, t).sample - net(x, t)).abs().max())
