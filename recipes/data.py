"""Image-classification data through Hugging Face ``datasets``, decoded once into uint8 tensors.

``--dataset`` accepts a hub id (``cifar10`` and ``cifar100`` are shorthands for
``uoft-cs/cifar10`` and ``uoft-cs/cifar100``), a directory written by
``Dataset.save_to_disk``, a directory or glob of parquet files, or ``digits``:
the real handwritten digits bundled with scikit-learn (8x8, resized to 32x32
RGB), which needs no network.  Images are decoded once to an ``N x 3 x 32 x 32``
uint8 tensor; augmentation happens later, batched, on the training device.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SHORTHANDS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
HUB_HOST = "huggingface.co"
OFFLINE_FIX = (
    "use --dataset digits (bundled with scikit-learn, no network), or point --dataset at local data: "
    "a directory written by Dataset.save_to_disk, or parquet files with an image and a label column"
)


@dataclass
class ImageData:
    train_x: torch.Tensor  # N x 3 x H x W, uint8
    train_y: torch.Tensor  # N, int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str

    @property
    def mean(self) -> torch.Tensor:
        return self.train_x.float().mean(dim=(0, 2, 3)) / 255

    @property
    def std(self) -> torch.Tensor:
        return self.train_x.float().std(dim=(0, 2, 3)) / 255


def load_image_data(
    dataset: str, *, image_column: str | None = None, label_column: str | None = None, size: int = 32
) -> ImageData:
    if dataset == "digits":
        return load_digits(size)
    import datasets  # imported here: the offline switches must be set first (see _load)

    ds = _load(dataset)
    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict({"train": ds})
    if "train" not in ds:
        raise ValueError(f"{dataset}: no 'train' split (found {sorted(ds)})")
    if "test" not in ds:
        split = ds["train"].train_test_split(test_size=0.1, seed=0)
        ds = datasets.DatasetDict({"train": split["train"], "test": split["test"]})
    features = ds["train"].features
    image_column = image_column or _pick(features, datasets.Image, ("img", "image"), dataset, "image")
    label_column = label_column or _pick(
        features, datasets.ClassLabel, ("label", "fine_label", "labels"), dataset, "label"
    )
    label_feature = features[label_column]
    num_classes = (
        label_feature.num_classes
        if isinstance(label_feature, datasets.ClassLabel)
        else int(max(max(ds[s][label_column]) for s in ds)) + 1
    )
    tensors = {split: _decode(ds[split], image_column, label_column, size) for split in ("train", "test")}
    return ImageData(*tensors["train"], *tensors["test"], num_classes=num_classes, name=dataset)


def load_digits(size: int = 32) -> ImageData:
    """scikit-learn's 1,797 handwritten digits, 8x8 in 0..16, as 32x32 RGB uint8; a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        test[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
    test_t = torch.from_numpy(test)
    return ImageData(images[~test_t], labels[~test_t], images[test_t], labels[test_t], 10, "digits")


def _load(dataset: str):
    import datasets

    path = Path(dataset)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        return datasets.load_from_disk(str(path))
    parquet = sorted(glob.glob(str(path / "**" / "*.parquet"), recursive=True)) if path.is_dir() else []
    if not parquet and dataset.endswith(".parquet"):
        parquet = sorted(glob.glob(dataset))
    if parquet:
        splits: dict[str, list[str]] = {}
        for f in parquet:
            name = Path(f).stem.split("-")[0]
            splits.setdefault(name if name in ("train", "test", "validation") else "train", []).append(f)
        return datasets.load_dataset("parquet", data_files=splits)
    if path.exists() or dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
        raise ValueError(f"--dataset {dataset!r}: no saved dataset or parquet files found there; {OFFLINE_FIX}")
    hub_id = SHORTHANDS.get(dataset, dataset)
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        # Offline: only the local cache can answer, and with these switches it answers at once.
        go_offline()
        try:
            return datasets.load_dataset(hub_id)
        except Exception as exc:
            raise ValueError(
                f"--dataset {dataset!r} needs the Hugging Face hub ({hub_id}), which is not reachable "
                f"and not cached; {OFFLINE_FIX}"
            ) from exc
    try:
        return datasets.load_dataset(hub_id)
    except Exception as exc:
        raise ValueError(f"--dataset {dataset!r}: could not load {hub_id} from the hub ({exc}); {OFFLINE_FIX}") from exc


def go_offline() -> None:
    import datasets
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
        datasets.config.HF_DATASETS_OFFLINE = True


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connect within ``timeout`` seconds (DNS included)."""

    def connect() -> bool:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout)
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def _pick(features, kind, names: tuple[str, ...], dataset: str, what: str) -> str:
    for column, feature in features.items():
        if isinstance(feature, kind):
            return column
    for name in names:
        if name in features:
            return name
    raise ValueError(f"{dataset}: no {what} column among {list(features)}; name it with --{what}-column")


def _decode(split, image_column: str, label_column: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from datasets import Image

    split = split.cast_column(image_column, Image(decode=True))
    images = np.empty((len(split), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(split[image_column]):
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size))
        images[i] = np.asarray(image)
    labels = torch.tensor(split[label_column], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


class Augment:
    """Random 32x32 crop of the 4-pixel zero-padded image, horizontal flip, per-channel normalisation.

    Runs on whole batches on the training device, so the data path never limits throughput.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, padding: int = 4) -> None:
        self.mean = mean.view(1, -1, 1, 1)
        self.std = std.view(1, -1, 1, 1)
        self.padding = padding

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))
        top = torch.randint(0, 2 * p + 1, (n, 1, 1), device=x.device)
        left = torch.randint(0, 2 * p + 1, (n, 1, 1), device=x.device)
        rows = (top + torch.arange(h, device=x.device).view(1, h, 1)).expand(n, h, w)
        cols = (left + torch.arange(w, device=x.device).view(1, 1, w)).expand(n, h, w)
        flip = torch.rand(n, 1, 1, device=x.device) < 0.5
        cols = torch.where(flip, left + (w - 1) - (cols - left), cols)
        batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
        crops = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        return self.normalize(crops)
