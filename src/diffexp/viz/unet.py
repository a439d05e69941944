"""U-Net anatomy: a layer table from a real forward pass and a diagram of the down/up path with skips."""
from __future__ import annotations

import torch

from diffexp.nets.layers import AttentionBlock, Downsample, ResBlock, TransformerBlock, Upsample
from diffexp.nets.unet import UNet


def _kind(layers) -> str:
    names = []
    for layer in layers:
        if isinstance(layer, ResBlock):
            names.append("ResBlock")
        elif isinstance(layer, TransformerBlock):
            names.append("Transformer (self + cross-attn)")
        elif isinstance(layer, AttentionBlock):
            names.append("SelfAttention")
        elif isinstance(layer, Downsample):
            names.append("Downsample")
        elif isinstance(layer, Upsample):
            names.append("Upsample")
        else:
            names.append(type(layer).__name__)
    return " + ".join(names)


def _conditioning(layers) -> str:
    inputs = []
    if any(isinstance(layer, ResBlock) and layer.temb_proj is not None for layer in layers):
        inputs.append("time")
    if any(isinstance(layer, TransformerBlock) for layer in layers):
        inputs.append("text")
    return ", ".join(inputs) or "-"


def layer_table(net: UNet, batch: int = 1) -> list[dict]:
    """One row per block in forward order, from a real forward pass (hooks record output shapes):
    {stage, index, block, output (C, H, W), params, inputs: where time/text embeddings enter,
    skip: "push" (down path saves its output) / "pop" (up path concatenates a saved one)}."""
    rows: list[dict] = []
    hooks = []

    def record(stage, index, module, skip):
        def hook(_module, _inputs, output):
            rows.append({"stage": stage, "index": index, "block": _kind(module), "output": tuple(output.shape[1:]),
                         "params": sum(p.numel() for layer in module for p in layer.parameters()), "inputs": _conditioning(module),
                         "skip": skip})
        return hook

    hooks.append(net.conv_in.register_forward_hook(record("in", 0, [net.conv_in], "push")))
    for stage, blocks in (("down", net.down), ("up", net.up)):
        for i, layers in enumerate(blocks):
            skip = "push" if stage == "down" else ("pop" if isinstance(layers[0], ResBlock) else "")
            hooks.append(layers[-1].register_forward_hook(record(stage, i, layers, skip)))
    hooks.append(net.mid[-1].register_forward_hook(record("mid", 0, net.mid, "")))
    hooks.append(net.conv_out.register_forward_hook(record("out", 0, [net.norm_out, net.conv_out], "")))
    try:
        x = torch.zeros(batch, net.in_channels, net.image_size, net.image_size)
        t = torch.zeros(batch, dtype=torch.long)
        kwargs = {}
        if net.context_dim:
            kwargs["context"] = torch.zeros(batch, 4, net.context_dim)
        with torch.no_grad():
            net(x, t, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    order = {"in": 0, "down": 1, "mid": 2, "up": 3, "out": 4}
    rows.sort(key=lambda r: (order[r["stage"]], r["index"]))
    return rows


def layer_table_markdown(net: UNet) -> str:
    """:func:`layer_table` as a markdown table, with the embedding MLPs and the total."""
    rows = layer_table(net)
    lines = ["| stage | block | output (C, H, W) | params | conditioning | skip |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} {r['index']} | {r['block']} | {r['output']} | {r['params']:,} | {r['inputs']} "
                     f"| {r['skip']} |")
    extra = sum(p.numel() for p in net.time_mlp.parameters())
    lines.append(f"| time MLP | sinusoid -> Linear-SiLU-Linear | ({net.base_channels * 4},) | {extra:,} | - | |")
    lines.append(f"| **total** | | | **{sum(p.numel() for p in net.parameters()):,}** | | |")
    return "\n".join(lines)


def unet_diagram(net: UNet):
    """A figure of the U: one box per block (height ~ resolution, label = block and shape), the down path
    on the left, the up path on the right, skip connections as arrows across."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    rows = layer_table(net)
    fig, ax = plt.subplots(figsize=(12, 0.42 * len(rows) + 1.5))
    colours = {"ResBlock": "#9ecae1", "Downsample": "#fdae6b", "Upsample": "#a1d99b", "Transformer": "#dadaeb",
               "SelfAttention": "#dadaeb"}
    down = [r for r in rows if r["stage"] in ("in", "down")]
    up = [r for r in rows if r["stage"] in ("up", "out")]
    mid = [r for r in rows if r["stage"] == "mid"]
    levels = sorted({r["output"][1] for r in rows}, reverse=True)

    def draw(r, x, y):
        depth = levels.index(r["output"][1])
        colour = next((c for k, c in colours.items() if r["block"].startswith(k) or k in r["block"]), "#eeeeee")
        ax.add_patch(Rectangle((x + 0.3 * depth, y), 3.2, 0.8, facecolor=colour, edgecolor="black", lw=0.6))
        ax.text(x + 0.3 * depth + 1.6, y + 0.4, f"{r['block']}\n{r['output']}  {r['params']:,} p", ha="center",
                va="center", fontsize=6.5)
        return (x + 0.3 * depth, y + 0.4)

    pushes = []
    for i, r in enumerate(down):
        pos = draw(r, 0.0, -i)
        if r["skip"] == "push":
            pushes.append(pos)
    for r in mid:
        draw(r, 4.0, -len(down))
    pops = []
    for i, r in enumerate(reversed(up)):  # drawn top (output) to bottom (first up block)
        x, y = draw(r, 8.0, -i)
        if r["skip"] == "pop":
            pops.append((x, y))
    # the top-most saved output (conv_in) feeds the top-most concatenating up block, and so on down the U
    for (x0, y0), (x1, y1) in zip(pushes, pops):
        ax.add_patch(FancyArrowPatch((x0 + 3.2, y0), (x1, y1), arrowstyle="->", color="gray", lw=0.5, alpha=0.6))
    ax.set_xlim(-0.5, 13), ax.set_ylim(-max(len(down), len(up)) - 1, 1)
    ax.axis("off")
    ax.set_title(f"U-Net: {sum(p.numel() for p in net.parameters()):,} parameters; time enters every ResBlock"
                 + (", text every Transformer block" if net.context_dim else ""), fontsize=10)
    return fig
