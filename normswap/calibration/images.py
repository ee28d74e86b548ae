"""A folder of images as calibration data: decoded, resized and normalized the way the model was
trained (given once on the command line), one batch at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import CalibrationError

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImagePreprocessing:
    """What the model expects of an image: `size` (resize the shorter side, then crop the centre
    to size x size; None: as they are), then x = (pixel / 255 - mean) / std per channel."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)


class ImageFolder(Dataset):
    """Every image file under `root` (recursively, in sorted order) as a (3, H, W) float tensor.
    Subfolders are read as they are, so a labelled folder tree (one folder per class) works: the
    labels are simply not read."""

    def __init__(self, root: str | Path, preprocessing: ImagePreprocessing) -> None:
        try:
            from PIL import Image  # noqa: F401 - checked here, used per image
        except ImportError as exc:  # pragma: no cover - pillow is a dependency
            raise CalibrationError("Reading a folder of images needs Pillow: python3 -m pip install pillow.") from exc
        self.root, self.preprocessing = Path(root), preprocessing
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not self.files:
            raise CalibrationError(
                f"Calibration data '{root}' is a folder with no images ({', '.join(SUFFIXES)}); give a folder of images or a tensor file."
            )
        channels = len(preprocessing.mean)
        if len(preprocessing.std) != channels or channels not in (1, 3):
            raise CalibrationError(
                f"--image-mean and --image-std need 1 or 3 values each (gray or RGB), got {len(preprocessing.mean)} and {len(preprocessing.std)}."
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB" if len(self.preprocessing.mean) == 3 else "L")
            if self.preprocessing.size is not None:
                image = _resized_and_cropped(image, self.preprocessing.size)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as exc:
            raise CalibrationError(
                f"Calibration image '{path}' cannot be read ({exc}); remove it or replace it."
            ) from exc
        x = torch.from_numpy(pixels)
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)  # (C, H, W)
        mean = torch.tensor(self.preprocessing.mean).view(-1, 1, 1)
        std = torch.tensor(self.preprocessing.std).view(-1, 1, 1)
        return (x - mean) / std


def _resized_and_cropped(image, size: tuple[int, int]):  # PIL images in and out
    """The shorter side resized to fit `size`, then the centre cropped to it (an eval transform)."""
    from PIL import Image

    height, width = size
    scale = max(height / image.height, width / image.width)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.Resampling.BILINEAR
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))
