"""Any folder of images, with optional captions in a Hugging Face imagefolder ``metadata.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from diffexp.data.base import ImageDataModule, split_indices

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


class FolderDataset(Dataset):
    """Image files as dict items; ``captions`` holds one caption per file (in file order) or is None."""

    def __init__(self, files: list[Path], captions: dict[str, str] | None, image_size: int, channels: int,
                 random_flip: bool, root: Path | None = None):
        from torchvision import transforms as T

        self.files, self.channels = files, channels
        names = [path.relative_to(root).as_posix() if root is not None else path.name for path in files]
        self.captions = None if captions is None else [captions.get(name, "") for name in names]
        tfs = [T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]
        if random_flip:
            tfs.append(T.RandomHorizontalFlip())
        tfs += [T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)]
        self.transform = T.Compose(tfs)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        with Image.open(path) as img:
            image = self.transform(img.convert("L" if self.channels == 1 else "RGB"))
        item = {"image": image}
        if self.captions is not None:
            item["caption"] = self.captions[i]
        return item


def read_metadata(root: Path) -> dict[str, str] | None:
    """file_name -> text from ``root/metadata.jsonl`` (one JSON object per line), or None if absent.
    ``file_name`` is the image's path relative to ``root`` (as in Hugging Face's imagefolder)."""
    path = root / "metadata.jsonl"
    if not path.exists():
        return None
    captions = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "file_name" not in row or "text" not in row:
            raise ValueError(f"{path}:{n}: each line needs 'file_name' and 'text', got keys {sorted(row)}")
        captions[Path(row["file_name"]).as_posix()] = row["text"]
    return captions


class ImageFolderDataModule(ImageDataModule):
    """Images found recursively under ``root``, center-cropped to ``image_size``, split train/val."""

    name = "image_folder"

    def __init__(self, root: str, image_size: int = 32, channels: int = 3, batch_size: int = 64,
                 val_fraction: float = 0.05, num_workers: int = 2, random_flip: bool = True, seed: int = 0):
        super().__init__(image_size=image_size, channels=channels, batch_size=batch_size, num_workers=num_workers,
                         seed=seed)
        self.root, self.val_fraction, self.random_flip = Path(root), val_fraction, random_flip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={str(self.root)!r} is not a directory")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise FileNotFoundError(f"data.root={str(self.root)!r} holds {len(files)} images; need at least 2 "
                                    f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        captions = read_metadata(self.root)
        train_idx, val_idx = split_indices(len(files), self.val_fraction, self.seed)
        make = lambda idx, flip: FolderDataset([files[i] for i in idx.tolist()], captions, self.image_size,  # noqa: E731
                                               self.channels, flip, self.root)
        self.train_set = make(train_idx, self.random_flip)
        self.val_set = make(val_idx, False)
