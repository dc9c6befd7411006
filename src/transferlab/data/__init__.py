"""Data layer: read image folders or CSVs, validate images, build transforms and datasets."""

from transferlab.data.datasets import ImageDataset
from transferlab.data.digits import default_datasets_root, materialize_digits
from transferlab.data.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    ImageError,
    file_digest,
    has_image_extension,
    load_image,
    probe_image,
)
from transferlab.data.sources import (
    LAYOUT_CLASS_FOLDERS,
    LAYOUT_CSV,
    LAYOUT_SPLIT_FOLDERS,
    SPLITS,
    DataSplits,
    Sample,
    load_splits,
)
from transferlab.data.transforms import (
    AUGMENT_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    eval_transform,
    train_transform,
)

__all__ = [
    "AUGMENT_PRESETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "LAYOUT_CLASS_FOLDERS",
    "LAYOUT_CSV",
    "LAYOUT_SPLIT_FOLDERS",
    "MAX_PIXELS",
    "SPLITS",
    "DataSplits",
    "ImageDataset",
    "ImageError",
    "Preprocessing",
    "Sample",
    "default_datasets_root",
    "eval_transform",
    "file_digest",
    "has_image_extension",
    "load_image",
    "load_splits",
    "materialize_digits",
    "probe_image",
    "train_transform",
]
