"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision, downloaded to ``data_dir`` only if asked."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from diffexp.data.base import ImageDataModule
from diffexp.registry import register_part

DATASETS = {
    # name: (torchvision class name, channels, native size, classes)
    "mnist": ("MNIST", 1, 28, 10),
    "fashion_mnist": ("FashionMNIST", 1, 28, 10),
    "cifar10": ("CIFAR10", 3, 32, 10),
}


class _DictDataset(Dataset):
    captions = None

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return {"image": image, "label": label}


@register_part
class TorchvisionDataModule(ImageDataModule):
    """A torchvision dataset as dict batches; images resized to ``image_size`` and mapped to [-1, 1]."""

    def __init__(self, name: str = "cifar10", data_dir: str = "data", image_size: int | None = None,
                 batch_size: int = 128, num_workers: int = 2, download: bool = False, random_flip: bool = False,
                 seed: int = 0, channels: int | None = None):
        if name not in DATASETS:
            raise ValueError(f"data.name={name!r}; choose one of {sorted(DATASETS)}")
        cls_name, native_channels, native, classes = DATASETS[name]
        if channels is not None and channels != native_channels:
            raise ValueError(f"data={name} has {native_channels} channels; got data.channels={channels}")
        channels = native_channels
        super().__init__(image_size=image_size or native, channels=channels, batch_size=batch_size,
                         num_workers=num_workers, seed=seed)
        self.name, self.cls_name, self.num_classes = name, cls_name, classes
        self.data_dir, self.download, self.random_flip = Path(data_dir), download, random_flip

    def _build(self, train: bool):
        import torchvision
        from torchvision import transforms as T

        tfs = [T.Resize(self.image_size, antialias=True)] if self.image_size != DATASETS[self.name][2] else []
        if train and self.random_flip:
            tfs.append(T.RandomHorizontalFlip())
        tfs += [T.ToTensor(), T.Normalize([0.5] * self.channels, [0.5] * self.channels)]
        cls = getattr(torchvision.datasets, self.cls_name)
        try:
            return cls(str(self.data_dir), train=train, transform=T.Compose(tfs), download=self.download)
        except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True ..."
            raise FileNotFoundError(
                f"data={self.name}: no {self.cls_name} files under {self.data_dir.resolve()}. Either run once with "
                f"network access and data.download=true, or place torchvision's {self.cls_name} files there "
                f"(data.data_dir=PATH)."
            ) from err

    def prepare_data(self) -> None:
        if self.download:
            self._build(True), self._build(False)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = _DictDataset(self._build(True))
            self.val_set = _DictDataset(self._build(False))
