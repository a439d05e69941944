"""diffusers' ``DiTTransformer2DModel`` -> diffexp's :class:`~diffexp.nets.DiT` (``net.init_from=``).

Both are the DiT of Peebles & Xie (2023); the names differ, and so do three things the map handles:

- diffusers keeps a copy of the timestep and class embedders in every block (``transformer_blocks.i.norm1.emb``;
  the conversion of the paper's weights copies the one shared embedder into each) and its final layer reads block
  0's. diffexp has one shared embedder: block 0's is taken, and a model whose blocks' embedders differ is refused.
- diffusers' self-attention has separate ``to_q``/``to_k``/``to_v``; diffexp's fused ``qkv`` is them stacked.
- The paper's models learn the variance too (``out_channels = 2 x in_channels``, Nichol & Dhariwal 2021): the
  last channels of each patch are the interpolation weights of the variance. diffexp's samplers use the fixed or
  ODE variance, so those rows of the final layer are dropped on import (the DiT pipeline's DDIM/DPM schedulers
  ignore them too); the epsilon channels are kept exactly.

Conventions that change no weight shape come from the source and are stored in the run config: the sinusoid's
frequency shift (diffusers' ``CombinedTimestepLabelEmbeddings`` uses 1, the paper 0) and the epsilon of the
LayerNorm before the MLP (``norm_eps``, diffusers' default 1e-5; the paper 1e-6).
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffexp.interop import InteropError, diffusers_source

#: diffusers config values the map requires (the DiT layout); anything else is refused, naming the key.
REQUIRED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
            "attention_bias": True}


def dit_options_from_diffusers(config: dict) -> dict:
    """The ``net.`` options of the DiT that represents the ``DiTTransformer2DModel`` of ``config``."""
    problems = [f"{key}={config.get(key, value)!r} (diffexp's DiT: {value!r})" for key, value in REQUIRED.items()
                if config.get(key, value) != value]
    if config.get("dropout", 0.0):
        problems.append(f"dropout={config['dropout']!r} (diffexp's DiT has none)")
    if problems:
        raise InteropError("this DiTTransformer2DModel has conventions diffexp's DiT cannot represent: "
                           + "; ".join(problems))
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise InteropError(f"out_channels={out_channels} with in_channels={in_channels}: diffexp's DiT predicts "
                           f"in_channels values (plus, on import, dropped learned-variance channels)")
    heads = config.get("num_attention_heads", 16)
    return {
        "image_size": config.get("sample_size", 32), "in_channels": in_channels, "out_channels": None,
        "patch_size": config.get("patch_size", 2), "depth": config.get("num_layers", 28),
        "hidden_size": heads * config.get("attention_head_dim", 72), "num_heads": heads, "mlp_ratio": 4.0,
        "num_classes": config.get("num_embeds_ada_norm", 1000), "context_dim": None,
        "time_freq_shift": 1.0, "mlp_norm_eps": float(config.get("norm_eps", 1e-5)),
        "learned_sigma": out_channels == 2 * in_channels,
    }


def diffusers_dit_config(net) -> dict:
    """The ``DiTTransformer2DModel`` config of the same layout as the class-conditional DiT ``net`` (the inverse of
    :func:`dit_options_from_diffusers`; fixed variance: ``out_channels = in_channels``). Text DiTs have no diffusers
    DiTTransformer2DModel counterpart (it has no cross-attention)."""
    if net.context_dim or not net.num_classes or net.blocks[0].fc1.out_features != 4 * net.hidden_size:
        raise InteropError(f"a DiTTransformer2DModel is class-conditional, without cross-attention, MLP ratio 4; "
                           f"this DiT has num_classes={net.num_classes}, context_dim={net.context_dim}, "
                           f"mlp_ratio={net.blocks[0].fc1.out_features / net.hidden_size:g}")
    return {**REQUIRED, "num_attention_heads": net.num_heads, "attention_head_dim": net.hidden_size // net.num_heads,
            "in_channels": net.in_channels, "out_channels": net.out_channels, "num_layers": net.depth,
            "sample_size": net.image_size, "patch_size": net.patch_size, "num_embeds_ada_norm": net.num_classes,
            "norm_eps": net.blocks[0].norm2.eps, "dropout": 0.0}


def dit_from_diffusers_state(state: dict[str, torch.Tensor], options: dict) -> dict[str, torch.Tensor]:
    """diffexp's DiT state dict from a ``DiTTransformer2DModel`` state dict (works on meta tensors)."""
    state = {k: v for k, v in state.items() if not k.endswith("pos_embed.pos_embed")}  # a fixed buffer
    depth, patch, channels = options["depth"], options["patch_size"], options["in_channels"]
    emb = "transformer_blocks.{}.norm1.emb."
    shared = [k[len(emb.format(0)):] for k in state if k.startswith(emb.format(0))]
    for i in range(1, depth):
        for name in shared:
            theirs, first = state.get(emb.format(i) + name), state[emb.format(0) + name]
            if theirs is None or (theirs.device.type != "meta" and not torch.equal(theirs, first)):
                raise InteropError(f"transformer_blocks.{i} has its own timestep/class embedder ({name}), unlike "
                                   f"block 0's: diffexp's DiT shares one embedder (as the paper's weights do)")
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    out = {
        "patch_embed.weight": take("pos_embed.proj.weight"), "patch_embed.bias": take("pos_embed.proj.bias"),
        "final_modulation.weight": take("proj_out_1.weight"), "final_modulation.bias": take("proj_out_1.bias"),
    }
    for ours, theirs in (("time_embed.0", "timestep_embedder.linear_1"), ("time_embed.2", "timestep_embedder.linear_2")):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(emb.format(0) + f"{theirs}.{p}")
    out["class_embed.weight"] = take(emb.format(0) + "class_embedder.embedding_table.weight")
    for i in range(depth):
        block = f"transformer_blocks.{i}."
        used.update(k for k in state if k.startswith(emb.format(i)))
        for p in ("weight", "bias"):
            out[f"blocks.{i}.modulation.{p}"] = take(block + f"norm1.linear.{p}")
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([take(block + f"attn1.to_{x}.{p}") for x in "qkv"])
            out[f"blocks.{i}.attn.proj.{p}"] = take(block + f"attn1.to_out.0.{p}")
            out[f"blocks.{i}.fc1.{p}"] = take(block + f"ff.net.0.proj.{p}")
            out[f"blocks.{i}.fc2.{p}"] = take(block + f"ff.net.2.{p}")
    weight, bias = take("proj_out_2.weight"), take("proj_out_2.bias")
    out_channels = weight.shape[0] // (patch * patch)
    # rows are (p, p, c) per token; keep the first in_channels (epsilon) of each patch position
    out["final_linear.weight"] = weight.reshape(patch, patch, out_channels, -1)[:, :, :channels].reshape(-1, weight.shape[1])
    out["final_linear.bias"] = bias.reshape(patch, patch, out_channels)[:, :, :channels].reshape(-1)
    left = sorted(set(state) - used)
    if left:
        raise InteropError(f"the DiTTransformer2DModel has weights diffexp's DiT has no place for: {left[:5]}")
    return out


def read_diffusers_dit(source: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of the ``DiTTransformer2DModel`` at ``source``: its folder (config.json), a pipeline
    folder (its ``transformer/``) or a hub id (``facebook/DiT-XL-2-256``: downloaded when online, else from the
    Hugging Face cache)."""
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        raise InteropError("net.init_from needs diffusers: pip install -e '.[diffusers]'") from None
    source, subfolder = diffusers_source(source, "transformer", "DiTTransformer2DModel", "facebook/DiT-XL-2-256")
    if not Path(source).expanduser().is_dir():
        subfolder = "transformer"  # the DiT pipelines' layout on the hub
    try:
        model = DiTTransformer2DModel.from_pretrained(source, subfolder=subfolder)
    except (OSError, EnvironmentError) as e:
        reason = " ".join(str(e).split())[:240]
        raise InteropError(f"net.init_from={str(source)!r}: no DiTTransformer2DModel could be loaded ({reason}); "
                           f"offline, download it once (huggingface-cli download {source}) or pass a local folder"
                           ) from None
    return dict(model.config), {k: v.detach().float() for k, v in model.state_dict().items()}


def import_diffusers_dit(net_cfg, source: str) -> dict[str, torch.Tensor]:
    """``net.init_from`` for a DiT: reads the source, checks that ``net_cfg``'s layout is the source's (an error
    naming each option to set otherwise), writes the conventions into ``net_cfg`` and returns the weights."""
    import sys

    config, state = read_diffusers_dit(source)
    options = dit_options_from_diffusers(config)
    check_dit_matches(net_cfg, options, source)
    net_cfg.time_freq_shift, net_cfg.mlp_norm_eps = options["time_freq_shift"], options["mlp_norm_eps"]
    weights = dit_from_diffusers_state(state, options)
    dropped = " (its learned-variance channels dropped: diffexp's samplers use the fixed or ODE variance)" \
        if options["learned_sigma"] else ""
    print(f"[diffexp] net.init_from={source}: DiTTransformer2DModel weights imported "
          f"({sum(v.numel() for v in weights.values()):,} parameters){dropped}", file=sys.stderr)
    return weights


def check_dit_matches(net_cfg, options: dict, source: str) -> None:
    """:class:`InteropError` naming each ``net.`` option whose value differs from the source's layout."""
    keys = ("image_size", "in_channels", "patch_size", "depth", "hidden_size", "num_heads", "num_classes")
    differing = [f"net.{k}={options[k]}" for k in keys if net_cfg.get(k) != options[k]]
    if net_cfg.get("context_dim"):
        differing.append("net.context_dim=null (conditioning=class: the DiT pipelines are class-conditional)")
    if float(net_cfg.get("mlp_ratio", 4.0)) != options["mlp_ratio"]:
        differing.append(f"net.mlp_ratio={options['mlp_ratio']}")
    if differing:
        raise InteropError(f"net.init_from={source!r} is a DiT of another layout than net= builds; set "
                           + ", ".join(differing) + " (or choose the matching net preset, data and conditioning)")
