"""Config helpers shared by the entry points: instantiation with user-facing errors, building a model."""
from __future__ import annotations

import hydra
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import InstantiationException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import MissingMandatoryValue

from diffexp.errors import MissingPackageError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's config tree


def node_name(cfg) -> str:
    """Where a config node sits in the run config (``trainer``, ``net``), or its ``_target_``."""
    key = cfg._get_full_key(None) if isinstance(cfg, DictConfig) else ""
    return key or (str(cfg.get("_target_", "a config node")) if hasattr(cfg, "get") else "a config node")


def instantiate(cfg, **kwargs):
    """``hydra.utils.instantiate``, re-raising what Hydra wraps as a user-facing error: a ValueError etc. as
    itself, a wrong keyword or type, an unimportable ``_target_`` or a Lightning misconfiguration (e.g.
    ``trainer=gpu`` without a GPU) as an :class:`OptionError` naming the config node."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as wrapped:
        cause = wrapped.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        where = node_name(cfg)
        if str(wrapped).startswith("Error locating target"):
            target = str(wrapped).split("'")[1]
            raise OptionError(f"{where}: _target_={target!r} cannot be imported (misspelt, or its package is not "
                              f"installed)") from None
        if isinstance(cause, TypeError) and ("unexpected keyword" in str(cause) or "required positional" in str(cause)):
            raise OptionError(f"{cfg.get('_target_', 'a config node') if hasattr(cfg, 'get') else cfg}: {cause}") from None
        if isinstance(cause, (TypeError, MisconfigurationException)):
            hint = " (a value of the wrong type among its options?)" if isinstance(cause, TypeError) else ""
            if where == "trainer":
                presets = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))
                hint = f" (trainer presets: {', '.join(presets)}; on a machine without a GPU use trainer=cpu)" if presets else ""
            raise OptionError(f"{where}: {cause}{hint}") from None
        if isinstance(cause, (ValueError, FileNotFoundError, KeyError, MissingPackageError)):
            raise cause from None
        raise


RENAMED_GROUPS = {"unet": "net"}  # group -> its new name (one step: the old name is an error that says the new)


def renamed_group(arg: str) -> str | None:
    """The renamed config group an override uses (``unet`` in ``unet=small``, ``~unet.x``, ``unet@a=b``), or None."""
    group = arg.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("@", 1)[0]
    return group if group in RENAMED_GROUPS else None


def renamed_override(arg: str) -> str | None:
    """``arg`` written with the new group name if it uses a renamed config group (``unet.init_from=x`` ->
    ``net.init_from=x``), else None."""
    group = renamed_group(arg)
    return arg.replace(group, RENAMED_GROUPS[group], 1) if group else None


def renamed_group_errors(args: list[str]) -> list[str]:
    """One line per command-line override that uses a renamed config group (``unet=small``, ``unet.init_from=``,
    ``-m unet=tiny,small``), saying what to type instead."""
    return [f"error: the {renamed_group(arg)!r} config group is now {RENAMED_GROUPS[renamed_group(arg)]!r} "
            f"(U-Nets and DiTs): write {renamed_override(arg)}" for arg in args if renamed_group(arg)]


PATTERN_OPTIONS = ("data.shards", "data.val_shards", "data.data_files")


def quote_shard_patterns(args: list[str]) -> list[str]:
    """``args`` with the values of shard-pattern options quoted for Hydra's override grammar, which reads
    ``{...}`` as a dictionary: ``data.shards='DIR/train-{000000..000099}.tar'`` as a shell passes it (quotes
    removed) reaches Hydra as the one string it was meant to be. Values already quoted are left alone. An option
    given several times (a shell expanded an unquoted pattern's braces into one argument per shard) exits with
    status 2 and says to quote it."""
    keys = [arg.partition("=")[0].lstrip("+~") for arg in args if "=" in arg]
    repeated = sorted({k for k in keys if k in PATTERN_OPTIONS and keys.count(k) > 1})
    if repeated:
        print(f"error: {repeated[0]} is given {keys.count(repeated[0])} times: the shell expanded the braces of an "
              f"unquoted pattern. Quote it: {repeated[0]}='DIR/train-{{000000..000099}}.tar'", file=sys.stderr,
              flush=True)
        sys.exit(2)
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in PATTERN_OPTIONS and ("{" in value or "," in value) \
                and not (value[:1] in "'\"" and value[:1] and value[-1:] == value[:1]) and not value.startswith("["):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(f"{key}{sep}{value}" if sep else arg)
    return out


def run_module_app(config_name: str, run) -> None:
    """The ``python -m diffexp.X key=value ...`` entry points: shard patterns quoted for Hydra, then ``run(cfg)`` on
    ``conf/<config_name>.yaml`` as a Hydra app, a user's error reported in one paragraph (:func:`reported_errors`)."""
    sys.argv[1:] = quote_shard_patterns(sys.argv[1:])

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def main(cfg: DictConfig):
        with reported_errors():
            return run(cfg)

    main()


def exit_on_renamed_groups(args: list[str]) -> None:
    """For the entry points: print :func:`renamed_group_errors` and exit with status 2 if there are any."""
    errors = renamed_group_errors(args)
    if errors:
        print("\n".join(errors), file=sys.stderr, flush=True)
        sys.exit(2)


class OptionError(TypeError):
    """A config holds an option the object it builds does not take (a user's override or preset)."""


USER_ERRORS = (ValueError, OptionError, FileNotFoundError, FileExistsError, PermissionError, MissingPackageError,
               MissingMandatoryValue)


@contextmanager
def reported_errors():
    """For the entry points: an error a user can cause (a bad option, path or checkpoint; a diverged run) is
    printed as one paragraph, ``error: ...``, and the process exits with status 2, without a traceback;
    ``HYDRA_FULL_ERROR=1`` lets the exception through with its traceback."""
    from diffexp.callbacks.guard import DivergenceError

    try:
        yield
    except (*USER_ERRORS, DivergenceError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(error, MissingMandatoryValue):
            error = f"{error.full_key} must be given (it has no default): add {error.full_key}=... to the command"
        print(f"error: {error}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)


def check_number(option: str, value, *, integer: bool = False, minimum: float | None = None,
                 positive: bool = False, maximum: float | None = None, allow_none: bool = False):
    """``value`` if it is a number of the kind asked for (an int for ``integer``, > 0 for ``positive``, in
    [minimum, maximum]); otherwise a ValueError naming ``option`` and what is allowed."""
    if value is None and allow_none:
        return value
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and (not positive or value > 0) and (minimum is None or value >= minimum)
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        wanted = "an integer" if integer else "a number"
        if positive:
            wanted = f"a positive {wanted.split()[-1]}"
        if minimum is not None and maximum is not None:
            wanted += f" in [{minimum}, {maximum}]"
        elif minimum is not None:
            wanted += f" >= {minimum}"
        raise ValueError(f"{option} must be {wanted}{' or null' if allow_none else ''}, got {value!r}")
    return value


def short(target: str) -> str:
    """The class name of a ``_target_``."""
    return str(target).rsplit(".", 1)[-1]


def has_target(node) -> bool:
    return isinstance(node, DictConfig) and "_target_" in node


def data_of_run(cfg: DictConfig, from_checkpoint: bool = True):
    """The datamodule of a run config; from a checkpoint's stored config only through the allow-listed targets."""
    if from_checkpoint:
        from omegaconf import OmegaConf

        from diffexp.checkpoints import check_targets

        check_targets(OmegaConf.to_container(cfg), "ckpt", nodes=("data",))
    return instantiate(cfg.data)


def build_autoencoder(vae_cfg: DictConfig, from_checkpoint: bool):
    """The frozen autoencoder of ``vae_cfg``. From a checkpoint that carries its weights (``vae.architecture``
    is recorded), only its architecture is built: the weights come with the model's state dict."""
    if from_checkpoint and vae_cfg.get("architecture") is not None:
        return instantiate(vae_cfg, ckpt=None)
    if from_checkpoint and vae_cfg.get("ckpt") and not Path(vae_cfg.ckpt).is_file():
        raise FileNotFoundError(f"this latent checkpoint was written before checkpoints carried their VAE: it needs the "
                                f"VAE checkpoint it was trained with at {vae_cfg.ckpt!r}, which does not exist; put it "
                                f"back there (or retrain: new latent checkpoints are self-contained)")
    return instantiate(vae_cfg)


def build_model(cfg: DictConfig, datamodule=None, from_checkpoint: bool = False):
    """The LightningModule of a train config, built part by part.

    A diffusion model (its config has a ``space``) is built in this order: the conditioner (with its text
    encoder, if ``text_encoder`` is set), the space (with its frozen autoencoder, if ``vae`` is set), the
    denoiser with what those two require (``net.context_dim`` / ``num_classes`` / ``in_channels`` /
    ``image_size``, filled where null), then the module. Derived values (class count from the data, U-Net
    arguments, the architecture of a VAE trained here) are written into ``cfg``, so the saved run config
    rebuilds the same model without the data or any file trained here (``from_checkpoint``; pretrained hub
    models are loaded by name as before). Other modules (``model=vae``) are instantiated as configured.
    """
    try:
        if "space" not in cfg.model:
            return instantiate(cfg.model)
        return build_diffusion_model(cfg, datamodule, from_checkpoint)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise OptionError(f"model={cfg.model._target_}: {e}. The composed model config holds an option this model does "
                        f"not take, often set by the experiment preset (the default, quickstart, configures "
                        f"diffusion); model=vae goes with experiment=shapes_vae") from None


def build_diffusion_model(cfg: DictConfig, datamodule=None, from_checkpoint: bool = False):
    """:func:`build_model` for a diffusion model: conditioner, space, denoiser, module."""
    encoder = instantiate(cfg.text_encoder) if has_target(cfg.get("text_encoder")) else None
    with open_dict(cfg):
        if "num_classes" in cfg.conditioning and cfg.conditioning.num_classes is None:
            datamodule = datamodule if datamodule is not None else data_of_run(cfg, from_checkpoint)
            cfg.conditioning.num_classes = datamodule.num_classes
        if encoder is not None and "encoder" not in cfg.conditioning:
            raise ValueError(f"a text encoder is set ({short(cfg.text_encoder._target_)}) but the conditioning "
                             f"({short(cfg.conditioning._target_)}) does not use text; use conditioning=text "
                             f"(or text_encoder=none)")
        conditioner = instantiate(cfg.conditioning, **({"encoder": encoder} if "encoder" in cfg.conditioning else {}))
        autoencoder = build_autoencoder(cfg.vae, from_checkpoint) if has_target(cfg.get("vae")) else None
        if autoencoder is not None and "autoencoder" not in cfg.model.space:
            raise ValueError(f"a VAE is set ({short(cfg.vae._target_)}) but the model's space "
                             f"({short(cfg.model.space._target_)}) does not diffuse latents; use model=latent (or vae=none)")
        space = instantiate(cfg.model.space, **({"autoencoder": autoencoder} if "autoencoder" in cfg.model.space else {}))
        if autoencoder is not None and autoencoder.architecture() is not None:
            cfg.vae.architecture = autoencoder.architecture()
        derived = {**space.net_arguments(cfg.data.image_size, cfg.data.channels), **conditioner.net_arguments()}
        for key, value in derived.items():
            if cfg.net.get(key) is None or key == "context_dim":
                cfg.net[key] = value
        source = cfg.net.get("init_from")
        imported = import_diffusers_net(cfg.net, source) if source and not from_checkpoint else None
        net = instantiate(without_init_from(cfg.net))
        if imported is not None:
            net.load_state_dict(imported)
    return instantiate(cfg.model, net=net, conditioner=conditioner, space=space)


def without_init_from(net_cfg: DictConfig) -> DictConfig:
    """The net config minus ``init_from`` (where its weights came from; kept in the run config as a record)."""
    net_cfg = net_cfg.copy()
    with open_dict(net_cfg):
        net_cfg.pop("init_from", None)
    return net_cfg


def import_diffusers_net(net_cfg: DictConfig, source: str) -> dict:
    """``net.init_from``: a diffusers model's weights in diffexp's names, for the backbone ``net=`` builds: a
    ``UNet2DModel`` for a U-Net (:func:`import_diffusers_unet`), a ``DiTTransformer2DModel`` for a DiT
    (:func:`diffexp.interop_dit.import_diffusers_dit`)."""
    target = str(net_cfg.get("_target_", ""))
    if target.endswith(".DiT"):
        from diffexp.interop_dit import import_diffusers_dit

        return import_diffusers_dit(net_cfg, source)
    return import_diffusers_unet(net_cfg, source)


def import_diffusers_unet(unet_cfg: DictConfig, source: str) -> dict:
    """``net.init_from`` (a U-Net): the weights of the diffusers ``UNet2DModel`` at ``source`` (folder or hub id) in
    diffexp's names. Its conventions (time-embedding order and frequency shift, downsampling padding) are written
    into ``unet_cfg``, so the run config rebuilds the same function; a layout other than ``unet_cfg``'s, or a
    text- or class-conditional U-Net (UNet2DModel pipelines have neither input), is an error naming why."""
    from diffexp.interop import (InteropError, check_unet_matches, from_diffusers_state, read_diffusers_unet,
                                 unet_options_from_diffusers)
    from diffexp.nets import UNet

    if unet_cfg.get("context_dim") or unet_cfg.get("num_classes"):
        kind = "text-conditioned (cross-attention)" if unet_cfg.get("context_dim") else "class-conditional"
        raise InteropError(f"net.init_from loads an unconditional diffusers UNet2DModel; this run's U-Net is {kind} "
                           f"and has layers UNet2DModel lacks (use conditioning=none)")
    config, state = read_diffusers_unet(source)
    options = unet_options_from_diffusers(config)
    check_unet_matches(unet_cfg, options, source)
    for key in ("time_embedding_order", "time_freq_shift", "downsample_padding"):
        unet_cfg[key] = options[key]
    net = instantiate(without_init_from(unet_cfg))
    if not isinstance(net, UNet):
        raise OptionError(f"net.init_from loads a diffusers UNet2DModel into diffexp's UNet, not {unet_cfg._target_}")
    weights = from_diffusers_state(net, state)
    print(f"[diffexp] net.init_from={source}: UNet2DModel weights imported ({sum(v.numel() for v in state.values()):,} "
          f"parameters; time embedding {options['time_embedding_order']}, freq shift {options['time_freq_shift']:g}, "
          f"downsample padding {options['downsample_padding']})", file=sys.stderr)
    return weights
