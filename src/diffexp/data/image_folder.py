"""Any folder of images, with optional captions in a Hugging Face imagefolder ``metadata.jsonl`` and optional
class labels from its top-level folders (torchvision's ImageFolder layout, e.g. ImageNet's train folder)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from diffexp.data.base import ImageDataModule, flip_key, split_indices
from diffexp.data.transforms import preprocess, to_mode
from diffexp.registry import register_part

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
LABEL_MODES = ("folders", "folder_ids")


def folder_classes(root: Path, labels: str) -> dict[str, int]:
    """Top-level folder name -> class label under ``root``: ``folders`` numbers the folders in sorted order
    (torchvision's ImageFolder; ImageNet's 1,000 synset folders get ImageNet's class ids), ``folder_ids`` reads
    each folder's name as its label (``207/`` holds class 207: a subset of a pretrained model's classes)."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"data.labels={labels}: data.root={str(root)!r} has no folders; put each class's "
                                f"images in a folder of its own (root/CLASS/image.png)")
    if labels == "folders":
        return {name: i for i, name in enumerate(names)}
    bad = [name for name in names if not name.isdigit()]
    if bad:
        raise ValueError(f"data.labels=folder_ids: folder names must be class numbers (0, 1, ..., 207, ...), got "
                         f"{bad[:5]} under data.root={str(root)!r}; data.labels=folders numbers folders of any "
                         f"name in sorted order")
    return {name: int(name) for name in names}


def open_image(path: Path, channels: int) -> Image.Image:
    """The image at ``path`` as 8-bit L (``channels`` 1) or RGB (see :func:`diffexp.data.transforms.to_mode`)."""
    with Image.open(path) as img:
        return to_mode(img, channels)


def unreadable_images(files: list[Path]) -> list[tuple[Path, str]]:
    """(file, reason) for each file PIL cannot open and decode."""
    bad = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()  # decodes the pixels: a truncated file fails here, not in a worker mid-training
        except Exception as e:  # PIL raises many kinds for broken files
            bad.append((path, f"{type(e).__name__}: {e}"[:120]))
    return bad


class FolderDataset(Dataset):
    """Image files as dict items; ``captions`` holds one caption per file (in file order) or is None;
    ``classes`` (top-level folder -> label, see :func:`folder_classes`) gives each item a ``label``."""

    def __init__(self, files: list[Path], captions: dict[str, str] | None, image_size: int, channels: int,
                 random_flip: bool, root: Path | None = None, classes: dict[str, int] | None = None):
        self.files, self.channels, self.image_size, self.random_flip = files, channels, image_size, random_flip
        names = [path.relative_to(root).as_posix() if root is not None else path.name for path in files]
        self.captions = None if captions is None else [captions.get(name, "") for name in names]
        self.labels = None if classes is None else [classes[path.relative_to(root).parts[0]] for path in files]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        i, flip = flip_key(key, len(self))  # the training sampler's keys carry the flip (random_flip)
        image = preprocess(open_image(self.files[i], self.channels), self.image_size, self.channels, flip)
        item = {"image": image}
        if self.captions is not None:
            item["caption"] = self.captions[i]
        if self.labels is not None:
            item["label"] = self.labels[i]
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


@register_part
class ImageFolderDataModule(ImageDataModule):
    """Images found recursively under ``root``, center-cropped to ``image_size``, split train/val.

    Every file is checked before training: unreadable ones are an error listing them (``skip_unreadable``
    leaves them out instead, with a warning). With a ``metadata.jsonl``, every image needs a caption
    (``allow_missing_captions`` gives the others the empty caption, i.e. unconditional examples). With
    ``labels`` (``folders`` or ``folder_ids``, see :func:`folder_classes`) each image is labelled by its
    top-level folder, for ``conditioning=class``; images outside a folder are then an error.
    """

    name = "image_folder"

    def __init__(self, root: str, image_size: int = 32, channels: int = 3, batch_size: int = 64,
                 val_fraction: float = 0.05, num_workers: int = 2, random_flip: bool = True, seed: int = 0,
                 skip_unreadable: bool = False, allow_missing_captions: bool = False, labels: str | None = None):
        super().__init__(image_size=image_size, channels=channels, batch_size=batch_size, num_workers=num_workers,
                         seed=seed)
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.root, self.val_fraction, self.random_flip = Path(root), val_fraction, random_flip
        self.skip_unreadable, self.allow_missing_captions = skip_unreadable, allow_missing_captions
        if labels is not None and labels not in LABEL_MODES:
            raise ValueError(f"data.labels={labels!r}; allowed: null (unlabelled), {', '.join(LABEL_MODES)}")
        self.labels, self._classes = labels, None

    @property
    def reference_key(self) -> str:
        """The data's name with a hash of its folder and preprocessing (cached features of another folder, or of the
        earlier bilinear resizing, are not reused)."""
        import hashlib

        text = repr((str(self.root.resolve()), self.val_fraction, self.seed, "pil-bicubic"))
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def classes(self) -> dict[str, int] | None:
        """Top-level folder -> class label (None without ``labels``), read from ``root`` once."""
        if self.labels is None:
            return None
        if self._classes is None:
            if not self.root.is_dir():
                raise FileNotFoundError(f"data.root={str(self.root)!r} is not a directory")
            self._classes = folder_classes(self.root, self.labels)
        return self._classes

    @property
    def num_classes(self) -> int | None:
        """1 + the largest label (the class count a ``conditioning=class`` model needs), None if unlabelled."""
        classes = self.classes()
        return None if classes is None else max(classes.values()) + 1

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={str(self.root)!r} is not a directory")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise FileNotFoundError(f"data.root={str(self.root)!r} holds {len(files)} images; need at least 2 "
                                    f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        classes = self.classes()
        loose = [p.name for p in files if classes is not None and len(p.relative_to(self.root).parts) == 1]
        if loose:
            raise ValueError(f"data.labels={self.labels}: {len(loose)} images lie directly in data.root="
                             f"{str(self.root)!r} (e.g. {loose[:3]}), outside any class folder; move them into one")
        bad = unreadable_images(files)
        if bad:
            listing = "; ".join(f"{p.relative_to(self.root)} ({why})" for p, why in bad[:5])
            if not self.skip_unreadable:
                raise ValueError(f"data.root={str(self.root)!r}: {len(bad)} of {len(files)} images cannot be read: "
                                 f"{listing}{' ...' if len(bad) > 5 else ''}. Remove them, or pass "
                                 f"data.skip_unreadable=true to leave them out")
            warnings.warn(f"data.skip_unreadable: leaving out {len(bad)} unreadable images: {listing}", stacklevel=2)
            files = [p for p in files if p not in {b for b, _ in bad}]
        captions = read_metadata(self.root)
        if captions is not None:
            missing = [p.relative_to(self.root).as_posix() for p in files
                       if p.relative_to(self.root).as_posix() not in captions]
            if missing and not self.allow_missing_captions:
                raise ValueError(f"data.root={str(self.root)!r}: metadata.jsonl has no caption for {len(missing)} of "
                                 f"{len(files)} images (e.g. {missing[:3]}); add them (file_name is the path "
                                 f"relative to data.root), or pass data.allow_missing_captions=true to give them "
                                 f"the empty caption")
        train_idx, val_idx = split_indices(len(files), self.val_fraction, self.seed)
        make = lambda idx, flip: FolderDataset([files[i] for i in idx.tolist()], captions, self.image_size,  # noqa: E731
                                               self.channels, flip, self.root, classes)
        self.train_set = make(train_idx, self.random_flip)
        self.val_set = make(val_idx, False)
