"""LightningDataModules yielding dict batches {"image": [-1, 1] NCHW, "label": LongTensor, "caption": [str]}."""
from diffexp.data.base import ImageDataModule, TensorImageDataset
from diffexp.data.digits import DigitsDataModule
from diffexp.data.hf import HFDataModule
from diffexp.data.image_folder import ImageFolderDataModule
from diffexp.data.latent_shards import LatentShardsDataModule
from diffexp.data.shapes import ShapesDataModule
from diffexp.data.torchvision_data import TorchvisionDataModule
from diffexp.data.webdataset import WebDatasetDataModule

__all__ = ["DigitsDataModule", "HFDataModule", "ImageDataModule", "ImageFolderDataModule", "LatentShardsDataModule",
           "ShapesDataModule", "TensorImageDataset", "TorchvisionDataModule", "WebDatasetDataModule"]
