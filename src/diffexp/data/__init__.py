"""LightningDataModules yielding dict batches {"image": [-1, 1] NCHW, "label": LongTensor}."""
from diffexp.data.base import ImageDataModule, TensorImageDataset
from diffexp.data.digits import DigitsDataModule
from diffexp.data.image_folder import ImageFolderDataModule
from diffexp.data.shapes import ShapesDataModule
from diffexp.data.torchvision_data import TorchvisionDataModule

__all__ = ["ImageDataModule", "TensorImageDataset", "DigitsDataModule", "TorchvisionDataModule", "ImageFolderDataModule", "ShapesDataModule"]
