"""Train a domain classifier and commit its weights: `python experiments/scripts/train_domain_classifier.py --dataset digits`.

Trains on the same train split the diffusion models use (random shifts as augmentation),
reports accuracy on the held-out validation split, and writes
src/diffexp/metrics/weights/<dataset>_classifier.pt and experiments/results/<dataset>_classifier.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from diffexp.data.base import split_indices
from diffexp.data.digits import load_digits_tensor
from diffexp.data.shapes import SHAPES, make_shapes
from diffexp.metrics.domain import DOMAIN_CLASSIFIERS, DomainClassifier, weights_path

ROOT = Path(__file__).resolve().parents[2]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero = background -1 padding)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def load(dataset: str):
    spec = DOMAIN_CLASSIFIERS[dataset]
    if dataset == "digits":
        images, labels = load_digits_tensor(spec["image_size"])
        train_idx, val_idx = split_indices(len(labels), 0.1, 0)  # the DigitsDataModule default split
        return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]
    if dataset == "shapes":  # class = colour * len(SHAPES) + shape; held-out pairs included (it judges all)
        x_train, _, y_train = make_shapes(12000, seed=100, image_size=spec["image_size"])
        x_val, _, y_val = make_shapes(2000, seed=101, image_size=spec["image_size"])
        return x_train, y_train[:, 0] * len(SHAPES) + y_train[:, 1], x_val, y_val[:, 0] * len(SHAPES) + y_val[:, 1]
    raise ValueError(f"--dataset {dataset!r}: choose one of {sorted(DOMAIN_CLASSIFIERS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits", choices=sorted(DOMAIN_CLASSIFIERS))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_val, y_val = load(args.dataset)
    model = DomainClassifier(**DOMAIN_CLASSIFIERS[args.dataset]).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(random_shift(x_train[idx], 1, gen).to(args.device)), y_train[idx].to(args.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model = model.cpu().eval()
    feature_scale = model.calibrate_feature_scale(x_train)
    with torch.no_grad():
        val_acc = (model(x_val).argmax(1) == y_val).float().mean().item()
        train_acc = (model(x_train).argmax(1) == y_train).float().mean().item()
    path = weights_path(args.dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    report = {"dataset": args.dataset, "held_out_accuracy": round(val_acc, 4), "n_held_out": len(y_val),
              "train_accuracy": round(train_acc, 4), "n_train": len(y_train), "epochs": args.epochs,
              "feature_scale": round(feature_scale, 6), "seed": args.seed, "weights": str(path.relative_to(ROOT))}
    out = ROOT / "experiments" / "results" / f"{args.dataset}_classifier.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
