"""Data for the training command line: ImageNet-style folders or synthetic images.

Layout expected by ``scconv-train DIR``::

    DIR/train/<class>/<image>   and   DIR/val/<class>/<image>

(torchvision ``ImageFolder``; class indices are the sorted folder names, so ``train`` and ``val``
must hold the same class folders). Transforms are the standard ImageNet ones of the PyTorch
example: ``RandomResizedCrop(size) + RandomHorizontalFlip`` for training, ``Resize(size / 0.875)
+ CenterCrop(size)`` for validation (256/224 at the default size), then ImageNet normalisation.
"""

import os

import torch
from PIL import Image
from torch.utils.data import Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Sizes of ImageNet-1k, used for --dummy exactly as the PyTorch ImageNet example does.
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_VAL_IMAGES = 50_000
# Validation resizes the shorter side to crop / 0.875 (256 for a 224 crop), then centre-crops.
CENTER_CROP_FRACTION = 0.875


class DataError(ValueError):
    """The dataset folder is not usable; the message says why and is meant for the user."""


def user_message(error: DataError) -> str:
    """The message of ``error`` as it was raised: a ``DataLoader`` worker's error reaches the
    main process as a new ``DataError`` whose message adds the worker's traceback."""
    text = str(error).rstrip()
    marker = f"{DataError.__module__}.{DataError.__name__}: "
    return text.rsplit(marker, 1)[1] if marker in text else text


def load_image(path: str):
    """torchvision's default image loader (RGB), with a ``DataError`` naming a file it cannot
    decode (empty, truncated or not an image) instead of PIL's bare exception."""
    try:
        return datasets.folder.default_loader(path)
    # PIL reports broken files as OSError (UnidentifiedImageError, truncated data), SyntaxError
    # ("broken PNG file"), ValueError, EOFError, or a DecompressionBombError for a header that
    # claims a huge size.
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path!r}: {type(error).__name__}: {error}") from None


def val_resize_size(image_size: int) -> int:
    """Shorter-side size that validation resizes to before the centre crop of ``image_size``."""
    return int(image_size / CENTER_CROP_FRACTION)


def train_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def val_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(val_resize_size(image_size)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _holds_an_image(folder: str) -> bool:
    """True as soon as one file with an image extension is found (ImageNet: stop early)."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(name.lower().endswith(IMG_EXTENSIONS) for name in files):
            return True
    return False


def check_split(root: str, split: str) -> list[str]:
    """Class names of ``root/split``; raises ``DataError`` if it is missing or a class is empty."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(
            f"dataset folder {root!r} has no {split!r} subfolder "
            f"(expected {folder}/<class>/<image>, torchvision ImageFolder layout)"
        )
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DataError(f"{folder} holds no class folders (expected {folder}/<class>/<image>)")
    empty = [name for name in classes if not _holds_an_image(os.path.join(folder, name))]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(
            f"class folder(s) {shown} in {folder} hold no images "
            f"(extensions looked for: {', '.join(IMG_EXTENSIONS)})"
        )
    return classes


def check_image_folders(root: str, evaluate: bool, num_classes: int) -> list[str]:
    """Validate ``root`` before any model is built; returns the class names.

    Training needs ``train`` and ``val`` with the same classes; ``evaluate`` needs only ``val``.
    The number of classes must fit the model's ``num_classes`` outputs.
    """
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root!r} does not exist or is not a folder")
    val_classes = check_split(root, "val")
    if not evaluate:
        train_classes = check_split(root, "train")
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(train_classes))
            raise DataError(
                f"train and val of {root!r} hold different class folders "
                f"(only in train: {only_train[:5]}, only in val: {only_val[:5]}); "
                "class indices would not match"
            )
    if len(val_classes) > num_classes:
        raise DataError(
            f"{root!r} has {len(val_classes)} classes but the model has {num_classes} outputs "
            "(--num-classes)"
        )
    return val_classes


def image_folder_datasets(root: str, image_size: int, evaluate: bool):
    """``(train, val)`` ImageFolders with the ImageNet transforms; ``train`` is None for -e."""

    def folder(split, transform):
        return datasets.ImageFolder(os.path.join(root, split), transform, loader=load_image)

    val = folder("val", val_transform(image_size))
    train = None if evaluate else folder("train", train_transform(image_size))
    return train, val


def dummy_datasets(image_size: int, num_classes: int, evaluate: bool):
    """Synthetic ``(train, val)`` of ImageNet-1k's sizes (random images, random labels)."""
    shape = (3, image_size, image_size)
    val = datasets.FakeData(IMAGENET_VAL_IMAGES, shape, num_classes, transforms.ToTensor())
    train = None
    if not evaluate:
        train = datasets.FakeData(IMAGENET_TRAIN_IMAGES, shape, num_classes, transforms.ToTensor())
    return train, val


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: every sample exactly once over all ranks.

    Used for validation instead of ``DistributedSampler``, which pads the last shard with
    repeated samples and would skew the summed top-1/top-5.
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loaders(
    train_set,
    val_set,
    batch_size: int,
    workers: int,
    distributed: bool,
    rank: int,
    world_size: int,
    pin_memory: bool,
    drop_last: bool = False,
):
    """``(train_loader, train_sampler, val_loader)``; ``train_*`` are None when evaluating.

    ``drop_last`` leaves out each epoch's last, smaller training batch."""
    train_loader = train_sampler = None
    if train_set is not None:
        if distributed:
            train_sampler = torch.utils.data.DistributedSampler(
                train_set, num_replicas=world_size, rank=rank, shuffle=True
            )
        train_loader = torch.utils.data.DataLoader(
            train_set,
            batch_size=batch_size,
            shuffle=train_sampler is None,
            sampler=train_sampler,
            num_workers=workers,
            pin_memory=pin_memory,
            drop_last=drop_last,
        )
    val_sampler = ShardSampler(len(val_set), rank, world_size) if distributed else None
    val_loader = torch.utils.data.DataLoader(
        val_set,
        batch_size=batch_size,
        shuffle=False,
        sampler=val_sampler,
        num_workers=workers,
        pin_memory=pin_memory,
    )
    return train_loader, train_sampler, val_loader
