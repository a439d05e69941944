"""The DiT backbone (diffexp.nets.dit): its parts against the paper and diffusers, the diffusers weight map
(net.init_from), and a DiT through every entry point (formulations, conditioning, latent space, EMA, LoRA,
compile, bf16, resume, editing, the playground)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import SHRINK, compose_config

pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel  # noqa: E402

from diffexp.config import build_model  # noqa: E402
from diffexp.interop import InteropError  # noqa: E402
from diffexp.interop_dit import dit_from_diffusers_state, dit_options_from_diffusers  # noqa: E402
from diffexp.nets import DiT, UNet  # noqa: E402
from diffexp.nets.contract import Denoiser  # noqa: E402
from diffexp.nets.dit import DIT_SIZES, dit_gflops, dit_parameters, paper_dit, sincos_2d  # noqa: E402

# facebook/DiT-XL-2-256's transformer/config.json
XL_CONFIG = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
             "num_layers": 28, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000,
             "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
             "norm_elementwise_affine": False}


def perturbed(net: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """``net`` with every parameter moved off its (partly zero) initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return net


def small_diffusers_dit(tmp_path, **overrides):
    """A random DiTTransformer2DModel of the paper's layout (learned sigma, 10 classes) at 16x16x1, saved."""
    config = {**XL_CONFIG, "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 1, "out_channels": 2,
              "num_layers": 2, "sample_size": 16, "num_embeds_ada_norm": 10, **overrides}
    torch.manual_seed(0)
    model = perturbed(DiTTransformer2DModel(**config)).eval()
    # the paper's conversion copies one embedder into every block
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    folder = tmp_path / "dit"
    model.save_pretrained(folder)
    return model, folder


def small_xl2_pipeline(tmp_path):
    """A random pipeline of DiT-XL/2's layout but small (2 blocks, width 128, 1,000 classes, learned sigma; a tiny
    KL VAE of factor 2 on 8x8 images), saved as diffusers does, and the overrides that point
    ``experiment=imagenet256_dit_xl2`` at it: (transformer, overrides)."""
    from diffusers import AutoencoderKL

    from tests.test_latent import TINY_KL

    source, _ = small_diffusers_dit(tmp_path, in_channels=4, out_channels=8, sample_size=4, num_embeds_ada_norm=1000)
    pipeline = tmp_path / "pipeline"
    source.save_pretrained(pipeline / "transformer")
    torch.manual_seed(0)
    AutoencoderKL(**TINY_KL).save_pretrained(pipeline / "vae")
    return source, [f"net.init_from={pipeline}", f"vae.name_or_path={pipeline / 'vae'}", "data.image_size=8",
                    "net.depth=2", "net.hidden_size=128", "net.num_heads=4"]


# --- the parts -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,grid", [(128, 8), (1152, 16)])
def test_position_embedding_is_the_papers_2d_sincos(dim, grid):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    reference = get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="pt").float()
    assert sincos_2d(dim, grid).shape == (grid * grid, dim)
    assert torch.allclose(sincos_2d(dim, grid), reference, atol=1e-6)


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
def test_unpatchify_places_each_tokens_patch(patch):
    net = DiT(image_size=16, in_channels=3, patch_size=patch, depth=1, hidden_size=32, num_heads=2)
    x = torch.randn(2, 3, 16, 16)
    n, c, h, w = x.shape
    # token (i, j) holds patch x[:, :, i*p:(i+1)*p, j*p:(j+1)*p] as (p, p, C)
    tokens = x.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, patch * patch * c)
    assert torch.equal(net.unpatchify(tokens, h, w), x)
    assert net.num_tokens == (16 // patch) ** 2 == net.patchify(x).shape[1]


def test_adaln_zero_starts_as_the_zero_function_and_blocks_as_identity():
    net = DiT(image_size=8, in_channels=2, depth=2, hidden_size=32, num_heads=2, num_classes=3, context_dim=8)
    for block in net.blocks:
        assert not block.modulation.weight.any() and not block.cross_attn.proj.weight.any()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([1.0, 500.0])
    context = torch.randn(2, 5, 8)
    assert not net(x, t, class_labels=torch.tensor([0, 3]), context=context).any()
    tokens = torch.randn(2, net.num_tokens, 32)
    c = net.conditioning(t, torch.tensor([0, 1]))
    assert torch.equal(net.blocks[0](tokens, c, context), tokens)  # gates 0: each residual branch adds nothing
    perturbed(net)
    assert net(x, t, class_labels=torch.tensor([0, 3]), context=context).abs().mean() > 1e-3


def test_conditioning_reaches_the_output_and_the_mask_hides_tokens():
    torch.manual_seed(0)
    net = perturbed(DiT(image_size=8, in_channels=1, depth=2, hidden_size=32, num_heads=2, num_classes=3,
                        context_dim=8))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    context, mask = torch.randn(2, 4, 8), torch.tensor([[True, True, False, False]] * 2)
    base = net(x, t, torch.tensor([0, 1]), context, mask, pooled=context[:, 0])
    assert not torch.allclose(base, net(x, t, torch.tensor([2, 1]), context, mask, pooled=context[:, 0]))
    assert not torch.allclose(base, net(x, t * 2, torch.tensor([0, 1]), context, mask, pooled=context[:, 0]))
    assert not torch.allclose(base, net(x, t, torch.tensor([0, 1]), context, mask, pooled=context[:, 1]))
    hidden = context.clone()
    hidden[:, 2:] = torch.randn(2, 2, 8)  # masked-out tokens changed: the same output
    assert torch.allclose(base, net(x, t, torch.tensor([0, 1]), hidden, mask, pooled=context[:, 0]), atol=1e-6)
    # no label: the null class (index num_classes)
    assert torch.equal(net(x, t, None, context, mask), net(x, t, torch.tensor([3, 3]), context, mask))


def test_flops_and_parameters_match_the_papers_table():
    """DiT paper Table 1 / 4 (256 px, 32x32x4 latents): Gflops S/2 6.06, B/2 23.01, L/2 80.71, XL/2 118.64 and
    XL/4 29.05, XL/8 7.39; parameters 33M, 130M, 458M, 675M (class-conditional, 1000 classes)."""
    paper_gflops = {("S", 2): 6.06, ("B", 2): 23.01, ("L", 2): 80.71, ("XL", 2): 118.64, ("XL", 4): 29.05,
                    ("XL", 8): 7.39}
    for (size, patch), gflops in paper_gflops.items():
        with torch.device("meta"):
            net = paper_dit(size, patch)
        assert dit_gflops(net) == pytest.approx(gflops, rel=0.01), (size, patch)
    for size, millions in {"S": 33, "B": 130, "L": 458, "XL": 675}.items():
        assert dit_parameters(size) / 1e6 == pytest.approx(millions, abs=0.6), size


def test_attention_maps_are_the_weights_the_blocks_use():
    """attention_weights @ v is what scaled_dot_product_attention computes; attention_maps gives one (N, heads, L, L)
    map per block, rows summing to 1; the course's figures and size table draw from them."""
    import matplotlib

    matplotlib.use("Agg")
    from diffexp.viz.dit import attention_figure, attention_maps, patch_figure, size_table_markdown

    torch.manual_seed(0)
    net = perturbed(DiT(image_size=8, in_channels=1, patch_size=2, depth=3, hidden_size=32, num_heads=4,
                        num_classes=3)).eval()
    tokens = torch.randn(2, 16, 32)
    q, k, v = net.blocks[0].attn.heads(tokens)
    weights = net.blocks[0].attn.attention_weights(tokens)
    torch.testing.assert_close(weights @ v, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])
    maps = attention_maps(net, x, t, class_labels=torch.tensor([0, 2]))
    assert maps.shape == (3, 2, 4, 16, 16)
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 2, 4, 16))
    assert not torch.allclose(maps[0], maps[1])
    assert len(attention_figure(maps, x[0], query=5, patch_size=2).axes) == 4
    assert len(patch_figure(x[0], 2).axes[0].texts) == 16
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in size_table_markdown().splitlines()[2:]}
    assert list(rows) == list(DIT_SIZES)
    depth, width, heads, params, *gflops = rows["XL"]
    assert (int(depth), int(width), int(heads)) == DIT_SIZES["XL"] and params == f"{dit_parameters('XL') / 1e6:.1f}M"
    assert [float(g) for g in gflops] == pytest.approx([118.64, 29.05, 7.39], rel=0.01)  # the paper's Table 4


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    net = perturbed(DiT(image_size=8, in_channels=1, depth=2, hidden_size=32, num_heads=2, context_dim=8))
    x, t, context = torch.randn(2, 1, 8, 8), torch.rand(2), torch.randn(2, 3, 8)
    grads = []
    for flag in (False, True):
        net.zero_grad()
        net.gradient_checkpointing = flag
        net(x, t, context=context, pooled=context[:, 0]).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_both_backbones_satisfy_the_denoiser_contract():
    unet = UNet(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                image_size=8)
    dit = DiT(image_size=8, in_channels=1, depth=1, hidden_size=32, num_heads=2)
    for net in (unet, dit):
        assert isinstance(net, Denoiser)
        assert net(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)
    assert not isinstance(torch.nn.Linear(2, 2), Denoiser)


@pytest.mark.parametrize("kwargs,match", [
    ({"patch_size": 3}, r"net.patch_size=3; allowed: \[1, 2, 4, 8\]"),
    ({"image_size": 10, "patch_size": 4}, "must be divisible by net.patch_size=4"),
    ({"depth": 0}, "net.depth must be a positive integer"),
])
def test_bad_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiT(**{"image_size": 8, "in_channels": 1, "hidden_size": 32, "num_heads": 2, **kwargs})


def test_wrong_inputs_are_refused():
    net = DiT(image_size=8, in_channels=1, depth=1, hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match="takes 8x8 inputs"):
        net(torch.randn(1, 1, 16, 16), torch.rand(1))
    with pytest.raises(ValueError, match="no cross-attention"):
        net(torch.randn(1, 1, 8, 8), torch.rand(1), context=torch.randn(1, 2, 4))


# --- diffusers' weights ----------------------------------------------------------------------------------------
def test_xl_key_map_covers_every_weight_on_the_meta_device():
    """facebook/DiT-XL-2-256's layout: every diffexp weight gets one of the same shape, nothing of theirs is
    left over, the learned-sigma rows of the final layer are dropped."""
    with torch.device("meta"):
        theirs = DiTTransformer2DModel(**XL_CONFIG)
    options = dit_options_from_diffusers(XL_CONFIG)
    assert options["learned_sigma"] and (options["hidden_size"], options["num_classes"]) == (1152, 1000)
    mapped = dit_from_diffusers_state(theirs.state_dict(), options)
    with torch.device("meta"):
        ours = DiT(**{k: v for k, v in options.items() if k != "learned_sigma"})
    expected = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in mapped.items()} == expected
    assert mapped["final_linear.weight"].shape == (2 * 2 * 4, 1152)  # of 2 * 2 * 8
    assert sum(v.numel() for v in mapped.values()) == sum(p.numel() for p in ours.parameters())


def test_init_from_a_diffusers_dit_gives_its_outputs(tmp_path):
    """net=dit_tiny conditioning=class net.init_from=FOLDER: the epsilon channels of the DiTTransformer2DModel to
    1e-5 on the CPU; the conventions (frequency shift 1, MLP norm eps 1e-5) written into the run config."""
    theirs, folder = small_diffusers_dit(tmp_path)
    cfg = compose_config("train", ["net=dit_tiny", "conditioning=class", "net.depth=2", f"net.init_from={folder}"],
                         tmp_path / "run")
    net = build_model(cfg).net.eval()
    assert cfg.net.time_freq_shift == 1.0 and cfg.net.mlp_norm_eps == 1e-5
    x = torch.randn(3, 1, 16, 16)
    t, labels = torch.tensor([0.0, 17.0, 999.0]), torch.tensor([0, 9, 10])  # 10: the null class
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=labels).sample[:, :1]
        assert (net(x, t, class_labels=labels) - expected).abs().max() < 1e-5


def test_diffusers_dit_config_is_the_inverse_of_the_import():
    """diffusers_dit_config(net) builds a DiTTransformer2DModel whose import is net's layout again, weight for
    weight (the benchmark's twin); text DiTs and other MLP ratios have no such twin."""
    from diffexp.interop_dit import diffusers_dit_config

    net = DiT(image_size=16, in_channels=3, patch_size=4, depth=3, hidden_size=64, num_heads=4, num_classes=7,
              mlp_norm_eps=1e-5)
    config = diffusers_dit_config(net)
    options = dit_options_from_diffusers(config)
    assert not options.pop("learned_sigma")
    keys = ("image_size", "in_channels", "patch_size", "depth", "hidden_size", "num_heads", "num_classes")
    assert {k: options[k] for k in keys} == {k: getattr(net, k) for k in keys}
    assert (options["mlp_ratio"], options["mlp_norm_eps"], options["context_dim"]) == (4.0, 1e-5, None)
    twin = DiTTransformer2DModel(**config)
    for block in twin.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(twin.transformer_blocks[0].norm1.emb.state_dict())
    mapped = dit_from_diffusers_state(twin.state_dict(), {**options, "learned_sigma": False})
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert sum(p.numel() for p in twin.parameters()) > sum(p.numel() for p in net.parameters())  # per-block embedders
    for other in (DiT(image_size=16, in_channels=3, depth=1, hidden_size=32, num_heads=2, context_dim=8),
                  DiT(image_size=16, in_channels=3, depth=1, hidden_size=32, num_heads=2, num_classes=3,
                      mlp_ratio=2.0)):
        with pytest.raises(InteropError, match="MLP ratio 4"):
            diffusers_dit_config(other)


def test_init_from_refuses_what_it_cannot_represent(tmp_path):
    _, folder = small_diffusers_dit(tmp_path)
    other = compose_config("train", ["net=dit_tiny", "conditioning=class", f"net.init_from={folder}"], tmp_path / "a")
    with pytest.raises(InteropError, match=r"set net.depth=2"):
        build_model(other)
    text = compose_config("train", ["experiment=shapes_text2img", "net=dit_tiny", "net.depth=2", "data=digits",
                                    "data.image_size=16", f"net.init_from={folder}"], tmp_path / "b")
    with pytest.raises(InteropError, match="net.context_dim=null"):
        build_model(text)
    with pytest.raises(InteropError, match="norm_type='ada_norm_single'"):
        dit_options_from_diffusers({**XL_CONFIG, "norm_type": "ada_norm_single"})
    theirs = DiTTransformer2DModel(**{**XL_CONFIG, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8})
    state = theirs.state_dict()  # random init: each block's embedder differs
    with pytest.raises(InteropError, match="shares one embedder"):
        dit_from_diffusers_state(state, dit_options_from_diffusers({**XL_CONFIG, "num_layers": 2}))
    missing = compose_config("train", ["net=dit_tiny", f"net.init_from={tmp_path / 'nothing'}"], tmp_path / "c")
    with pytest.raises((FileNotFoundError, InteropError), match="nothing"):
        build_model(missing)


# --- a DiT through every entry point -----------------------------------------------------------------------------
DIT = ["net=dit_tiny", "net.depth=2", "net.hidden_size=32", "net.num_heads=2"]


def train_dit(tmp_path, *overrides: str, name: str = "run"):
    from diffexp.train import run

    run(compose_config("train", [*SHRINK, *DIT, "paths.latest_link=null", *overrides], tmp_path / name))
    return tmp_path / name / "checkpoints"


def sample_dit(tmp_path, ckpt, *overrides: str):
    from diffexp.sample import run

    out = tmp_path / "samples"
    summary = run(compose_config("sample", [f"ckpt={ckpt}", "n=2", "sampler.steps=2", "progress=false",
                                            "device=cpu", f"out={out}", *overrides], tmp_path / "s"))
    assert (out / "grid.png").is_file() and summary["n"] == 2
    return summary


def test_dit_trains_class_conditional_and_samples_with_guidance(tmp_path):
    ckpts = train_dit(tmp_path, "conditioning=class")
    from diffexp.api import load_model

    model, _ = load_model(ckpts / "last.ckpt")
    assert isinstance(model.net, DiT) and model.net.num_classes == 10
    sample_dit(tmp_path, ckpts / "last.ckpt", "guidance_scale=2")


@pytest.mark.parametrize("overrides", [
    ["formulation=edm"],
    ["formulation=ddpm", "sampler=ddpm"],
    ["formulation=flow", "trainer.precision=bf16-mixed", "model.sample_precision=bf16"],
    ["experiment=shapes_text2img", "++data.num_train=32", "++data.num_val=8"],
], ids=["edm", "ddpm", "flow-bf16", "text"])
def test_dit_trains_and_samples_on_every_formulation_and_conditioning(tmp_path, overrides):
    ckpts = train_dit(tmp_path, *overrides)
    text = ["prompt=a red circle", "guidance_scale=3"] if "experiment=shapes_text2img" in overrides else []
    sample_dit(tmp_path, ckpts / "last.ckpt", *text)


def test_latent_dit_trains_and_samples(tmp_path, vae_ckpt, monkeypatch):
    monkeypatch.setenv("DIFFEXP_CACHE", str(tmp_path / "cache"))
    ckpts = train_dit(tmp_path, "experiment=shapes_latent", f"vae.ckpt={vae_ckpt}", "data.num_train=32",
                      "data.num_val=8", "model.space.scale_estimate_images=16", *DIT)
    from diffexp.api import load_model

    model, _ = load_model(ckpts / "last.ckpt")
    assert (model.net.in_channels, model.net.image_size) == (4, 8)  # the VAE's latents
    sample_dit(tmp_path, ckpts / "last.ckpt")


def test_dit_resumes_fine_tunes_with_lora_edits_and_plays(tmp_path):
    """Resume (ckpt_path), EMA weights in the checkpoint, LoRA on the attention and MLP projections from
    init_from, SDEdit, and the playground's sampling path, all on one DiT run."""
    from diffexp.api import load_model
    from diffexp.app import build_sampler, conditions_for, sample_images
    from diffexp.editing import edit

    first = train_dit(tmp_path, "conditioning=class", name="first")
    resumed = train_dit(tmp_path, "conditioning=class", f"ckpt_path={first / 'last.ckpt'}", "trainer.max_steps=6",
                        name="resumed")
    model, _ = load_model(resumed / "last.ckpt")
    saved = torch.load(resumed / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 6 and saved["callbacks"]["EMA"]["num_updates"] == 6  # EMA resumed with the run
    assert set(saved["callbacks"]["EMA"]["ema_state"]) == {k for k in saved["state_dict"] if k.startswith("net.")}

    lora = train_dit(tmp_path, "conditioning=class", f"init_from={resumed / 'last.ckpt'}", "model.lora.rank=2",
                     name="lora")
    tuned, _ = load_model(lora / "last.ckpt")
    names = [n for n, _ in tuned.net.named_modules()]
    for layer in ("attn.qkv", "attn.proj", "fc1", "fc2"):
        assert any(n.endswith(f"{layer}.lora_A") for n in names), layer
    sample_dit(tmp_path, lora / "last.ckpt")

    images = torch.rand(2, 1, 16, 16) * 2 - 1
    out = edit(model, images, strength=0.5, sampler=build_sampler(model, "ddim", 4), progress=False,
               **conditions_for(model, 2, None))
    assert out.shape == images.shape and not torch.equal(out, images)
    grid = sample_images(model, build_sampler(model, "euler", 2), 2, 0, conditions_for(model, 2, None), 1.5)
    assert grid.shape == (2, 1, 16, 16)


@pytest.mark.slow
def test_compiled_dit_matches_eager():
    torch.manual_seed(0)
    net = perturbed(DiT(image_size=8, in_channels=1, depth=2, hidden_size=32, num_heads=2, num_classes=3)).eval()
    x, t, labels = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        eager = net(x, t, labels)
        compiled = torch.compile(net)(x, t, labels)
    assert torch.allclose(eager, compiled, atol=1e-5)


def test_fsdp_refuses_callbacks_that_need_the_whole_model():
    from types import SimpleNamespace

    from diffexp.callbacks.ema import EMA
    from diffexp.fsdp import check_sharded_callbacks, fsdp_strategy

    sharded = SimpleNamespace(strategy=fsdp_strategy())
    with pytest.raises(ValueError, match=r"callbacks \['EMA'\] need the whole model.*callbacks=fsdp"):
        check_sharded_callbacks(sharded, [EMA(decay=0.99)])
    check_sharded_callbacks(sharded, [])
    with pytest.raises(ValueError, match="reshard_after_forward must be true"):
        fsdp_strategy(reshard_after_forward="HALF")
    with pytest.raises(ValueError, match="cpu_offload must be true or false"):
        fsdp_strategy(cpu_offload="yes")


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_trains_as_ddp_and_resumes_exactly(tmp_path):
    """``trainer=fsdp_cpu``: the net is sharded (FSDP2 modules), 8 steps give DDP's weights (to float rounding of
    the other reduction order), a run resumed from step 3 (mid-epoch) ends bit-identical, and sample.py reads
    the gathered model.safetensors."""
    from tests.conftest import run_script

    from diffexp.checkpoints import load_file

    base = ["callbacks=fsdp", "data=shapes", "data.num_train=32", "data.num_val=8", "data.batch_size=8", *DIT,
            "formulation=edm", "trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=3",
            "eval_every=1000", "paths.latest_link=null", "logger=csv", "trainer.enable_progress_bar=false"]
    full = run_script("train.py", "trainer=fsdp_cpu", *base, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path,
                      check=True)
    assert "FSDPDiT" in full.stdout + full.stderr  # the model summary names the sharded net's class
    start = tmp_path / "full" / "checkpoints" / "step0000003.ckpt"
    run_script("train.py", "trainer=fsdp_cpu", *base, f"hydra.run.dir={tmp_path / 'resumed'}", f"ckpt_path={start}",
               cwd=tmp_path, check=True)
    run_script("train.py", "trainer=ddp_cpu", *base, f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path, check=True)
    reference = load_file(tmp_path / "full" / "checkpoints" / "step0000006.ckpt")
    resumed = load_file(tmp_path / "resumed" / "checkpoints" / "step0000006.ckpt")
    ddp = load_file(tmp_path / "ddp" / "checkpoints" / "step0000006.ckpt")
    assert resumed["global_step"] == reference["global_step"] == 6
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
        assert torch.allclose(value, ddp["state_dict"][key], atol=1e-6), key
    for moment in ("exp_avg", "exp_avg_sq"):
        for index, state in reference["optimizer_states"][0]["state"].items():
            assert torch.equal(state[moment], resumed["optimizer_states"][0]["state"][index][moment])
    out = tmp_path / "samples"
    run_script("sample.py", f"ckpt={tmp_path / 'full' / 'checkpoints' / 'model.safetensors'}", "n=4", "batch_size=4",
               "sampler.steps=3", "progress=false", f"out={out}", cwd=tmp_path, check=True)
    import numpy as np

    with np.load(out / "samples.npz") as saved:
        images = next(iter(saved.values()))
    assert images.shape[0] == 4 and images.std() > 0


def test_build_refuses_bad_arguments(tmp_path):
    from diffexp.build import parse

    assert parse(["net=dit_s", f"out={tmp_path / 'w.safetensors'}"]) == (["net=dit_s"], tmp_path / "w.safetensors",
                                                                          False)
    with pytest.raises(ValueError, match="out= is required"):
        parse(["net=dit_s"])
    with pytest.raises(ValueError, match="must end in .safetensors"):
        parse([f"out={tmp_path / 'w.ckpt'}"])
    with pytest.raises(ValueError, match="overwrite='maybe'; allowed"):
        parse([f"out={tmp_path / 'w.safetensors'}", "overwrite=maybe"])
    (tmp_path / "w.safetensors").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=true"):
        parse([f"out={tmp_path / 'w.safetensors'}"])


@pytest.mark.slow
def test_build_writes_an_imported_dit_that_sample_py_reads(tmp_path):
    """The README's online DiT-XL/2 commands, as typed, on a random pipeline of the same layout but small (2
    blocks, width 128, 1,000 classes, a tiny KL VAE of factor 2 on 8x8 images): ``python -m diffexp.build
    experiment=imagenet256_dit_xl2`` writes weights whose net is diffusers' transformer (epsilon channels, to 1e-5),
    sample.py samples from them, and an existing file is not replaced without overwrite=true."""
    import numpy as np

    from tests.conftest import run_script

    from diffexp.api import load_model

    source, small = small_xl2_pipeline(tmp_path)
    out = tmp_path / "weights" / "dit.safetensors"
    run_script("-m", "diffexp.build", "experiment=imagenet256_dit_xl2", *small, f"out={out}", cwd=tmp_path,
               check=True)
    model, cfg = load_model(out)
    assert cfg.conditioning.num_classes == 1000 and model.guidance_scale == 4.0
    x, t, labels = torch.randn(3, 4, 4, 4), torch.tensor([10, 500, 999]), torch.tensor([0, 207, 999])
    with torch.no_grad():
        ours = model.net(x, t.float(), class_labels=labels)
        theirs = source(x, timestep=t, class_labels=labels).sample[:, :4]
    assert torch.allclose(ours, theirs, atol=1e-5)
    samples = tmp_path / "samples"
    run_script("sample.py", f"ckpt={out}", "n=4", "batch_size=4", "sampler.steps=2", "progress=false",
               f"out={samples}", cwd=tmp_path, check=True)
    with np.load(samples / "samples.npz") as saved:
        assert saved["images"].shape == (4, 8, 8, 3) and saved["labels"].tolist() == [0, 1, 2, 3]
    again = run_script("-m", "diffexp.build", "experiment=imagenet256_dit_xl2", *small, f"out={out}", cwd=tmp_path)
    assert again.returncode != 0 and "exists; pass overwrite=true" in again.stderr


def test_readme_dit_commands_compose_as_typed(tmp_path):
    """Every train.py and diffexp.build command of the README's DiT section composes as typed and builds a DiT
    (the section's training runs themselves are tested shrunk above; the build runs offline only on a small copy)."""
    import shlex

    from tests.conftest import readme_commands

    commands = [c for c in readme_commands() if "dit" in c and c.startswith(("python train.py", "python -m diffexp.build"))]
    assert len(commands) >= 6, commands
    for command in commands:
        args = [a for a in shlex.split(command)[2:] if a not in ("diffexp.build",) and not a.startswith("out=")]
        cfg = compose_config("train", args, tmp_path / "run")
        assert cfg.net._target_ == "diffexp.nets.DiT", command
        if "trainer=fsdp" in command:
            assert cfg.trainer.strategy._target_ == "diffexp.fsdp.fsdp_strategy" and "EMA" not in str(cfg.callbacks)


def test_attention_heads_split_the_fused_qkv_and_keep_a_wrapped_one():
    """q, k, v from the fused weight's row blocks equal the (N, L, 3D) product cut into heads; a wrapped ``qkv``
    (a LoRA adapter) is called as its module, so its adapter is not bypassed."""
    from diffexp.nets.dit import SelfAttention

    torch.manual_seed(0)
    attention, x = SelfAttention(64, 4), torch.randn(2, 9, 64)
    reference = attention.qkv(x).reshape(2, 9, 3, 4, 16).permute(2, 0, 3, 1, 4)
    for ours, theirs in zip(attention.heads(x), reference):
        assert torch.allclose(ours, theirs, atol=1e-6)

    class Shifted(torch.nn.Module):  # a wrapper whose output differs from its base layer's
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) + 1.0

    attention.qkv = Shifted(attention.qkv)
    for ours, theirs in zip(attention.heads(x), reference):
        assert torch.allclose(ours, theirs + 1.0, atol=1e-6)
