"""DiT anatomy: the patch tokens of an image, the attention maps of each block, and the paper's sizes."""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from diffexp.nets.dit import DIT_SIZES, DiT, dit_gflops, paper_dit


def patch_figure(image: torch.Tensor, patch_size: int):
    """An image (C, H, W) in [-1, 1] with its p x p patches outlined and numbered in token order (row-major)."""
    channels, height, width = image.shape
    shown = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).squeeze(-1).cpu()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(shown, cmap="gray" if channels == 1 else None, extent=(0, width, height, 0))
    for edge in range(0, max(height, width) + 1, patch_size):
        ax.axhline(edge, color="tab:orange", lw=1)
        ax.axvline(edge, color="tab:orange", lw=1)
    columns = width // patch_size
    for token in range((height // patch_size) * columns):
        row, column = divmod(token, columns)
        ax.text((column + 0.5) * patch_size, (row + 0.5) * patch_size, str(token), color="tab:orange",
                ha="center", va="center", fontsize=7)
    ax.set_title(f"{(height // patch_size) * columns} tokens of {patch_size}x{patch_size}x{channels} values")
    ax.set_xticks([]), ax.set_yticks([])
    return fig


@torch.no_grad()
def attention_maps(net: DiT, x: torch.Tensor, t: torch.Tensor, **condition) -> torch.Tensor:
    """The self-attention weights of every block in one forward pass of ``net``: (depth, N, heads, L, L), from
    each block's modulated input (hooks on the blocks' attention)."""
    inputs = []
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0])))
             for block in net.blocks]
    try:
        net(x, t, **condition)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([module.attention_weights(tokens) for module, tokens in inputs])


def attention_figure(maps: torch.Tensor, image: torch.Tensor, query: int, patch_size: int, blocks=None):
    """Where token ``query`` looks in each of ``blocks`` (default: all), averaged over heads, for the first sample of
    ``maps`` (:func:`attention_maps`); the image with the query patch outlined first."""
    depth, _, _, length, _ = maps.shape
    blocks = list(range(depth)) if blocks is None else list(blocks)
    side = int(length ** 0.5)
    fig, axes = plt.subplots(1, len(blocks) + 1, figsize=(2 * (len(blocks) + 1), 2.3))
    channels = image.shape[0]
    axes[0].imshow(((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).squeeze(-1).cpu(),
                   cmap="gray" if channels == 1 else None)
    row, column = divmod(query, side)
    axes[0].add_patch(plt.Rectangle((column * patch_size - 0.5, row * patch_size - 0.5), patch_size, patch_size,
                                    fill=False, color="tab:orange", lw=2))
    axes[0].set_title(f"query token {query}")
    for ax, block in zip(axes[1:], blocks):
        ax.imshow(maps[block, 0, :, query].mean(0).reshape(side, side).cpu(), cmap="viridis")
        ax.set_title(f"block {block}")
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    return fig


def size_table_markdown(patch_sizes=(2, 4, 8), image_size: int = 32, in_channels: int = 4,
                        num_classes: int = 1000) -> str:
    """The DiT paper's Table 1 as diffexp builds it (on the meta device): depth, width, heads, parameters and
    forward Gflops (:func:`~diffexp.nets.dit.dit_gflops`) per size and patch size, at ``image_size`` (32x32x4:
    the latents of 256 px images)."""
    header = (f"| size | depth | width | heads | parameters (/{patch_sizes[0]}) | "
              + " | ".join(f"Gflops /{p} ({(image_size // p) ** 2} tokens)" for p in patch_sizes) + " |")
    lines = [header, "|" + "---|" * (5 + len(patch_sizes))]
    for size, (depth, width, heads) in DIT_SIZES.items():
        with torch.device("meta"):
            nets = [paper_dit(size, p, image_size, in_channels, num_classes) for p in patch_sizes]
        params = sum(p.numel() for p in nets[0].parameters())
        lines.append(f"| {size} | {depth} | {width} | {heads} | {params / 1e6:.1f}M | "
                     + " | ".join(f"{dit_gflops(net):.2f}" for net in nets) + " |")
    return "\n".join(lines)
