"""The contract between the worker and a model implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from pydicom.dataset import Dataset

from pacsnode.errors import ManifestError
from pacsnode.manifest import Manifest, verified_weights_path
from pacsnode.volumes import Volume


@dataclass(frozen=True)
class ImageResult:
    """Per-image classifier output: probability of every manifest label, in manifest order.

    ``heatmaps`` (only when asked for, and only for reported labels at or above their
    threshold) maps a label to where the network looked: a float32 map in [0, 1] on the
    network's own coarse grid, which covers the whole image (the network sees the whole
    image resized, whatever its aspect); :func:`heatmap_on_source` puts it on the source
    pixel grid.
    """

    sop_instance_uid: str
    sop_class_uid: str
    probabilities: dict[str, float]
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict, compare=False)
    features: np.ndarray | None = field(default=None, compare=False, repr=False)
    """The network's penultimate features of the image, for the out-of-distribution gate."""


def heatmap_on_source(coarse: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Upsample a coarse non-negative whole-image map to ``rows x columns`` source pixels.

    Bicubic (Keys a = -0.5, as PIL's BICUBIC), cell centres at the centres of the equal parts of
    the image they summarise (``align_corners=False``), edges clamped; then negative
    overshoot is cut and the maximum brought back to the coarse maximum. Bicubic rather than
    bilinear: a bilinear map has its maximum on a cell centre, one of 49 places, and shows
    the grid as diamonds; the bicubic peak can lie between two hot cells. Separable, two
    small matrix products: a 2048x2048 map costs milliseconds. Returns float32.
    """
    if coarse.ndim != 2 or min(coarse.shape) < 1 or rows < 1 or columns < 1:
        raise ValueError(f"coarse: a non-empty 2D map is needed, not shape {coarse.shape}")
    grid = np.asarray(coarse, dtype=np.float32)
    heat = _cubic_weights(rows, grid.shape[0]) @ grid @ _cubic_weights(columns, grid.shape[1]).T
    heat = np.maximum(heat, 0.0)
    peak, top = float(heat.max()), float(grid.max())
    if peak > 0:
        heat *= np.float32(top / peak)
    return heat


def _cubic_weights(n: int, k: int, a: float = -0.5) -> np.ndarray:
    """``n x k`` matrix resampling ``k`` cells to ``n`` (Keys cubic convolution)."""
    pos = (np.arange(n) + 0.5) * k / n - 0.5
    base = np.floor(pos).astype(np.int64)
    out = np.zeros((n, k), dtype=np.float32)
    for offset in (-1, 0, 1, 2):
        index = base + offset
        x = np.abs(pos - index)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        weight = np.where(x <= 1, near, np.where(x < 2, far, 0.0))
        np.add.at(out, (np.arange(n), np.clip(index, 0, k - 1)), weight)
    return out


class ImageClassifier(ABC):
    """A warm, batched per-image classifier (the CXR model is one)."""

    manifest: Manifest
    device: torch.device

    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path, device: torch.device) -> ImageClassifier:
        """Load the manifest and verified weights from ``model_dir`` onto ``device``."""

    @abstractmethod
    def predict(self, datasets: Sequence[Dataset], *, heatmaps: bool = False) -> list[ImageResult]:
        """Classify the images (full datasets with pixels) in one batched pass.

        With ``heatmaps``, each result also holds a map for every reported label at or
        above its threshold, from the same pass (probabilities unchanged); a model that
        cannot explain itself returns none.
        Raises :class:`pacsnode.errors.InputError` naming the instance when one
        cannot be decoded or preprocessed.
        """


NetworkT = TypeVar("NetworkT", bound=torch.nn.Module)


def load_weights(
    network: NetworkT, model_dir: Path, manifest: Manifest, device: torch.device
) -> NetworkT:
    """``network`` with the verified weights of ``model_dir``, on ``device``, in eval mode;
    a file that does not fit the architecture is a :class:`ManifestError` naming it."""
    path = verified_weights_path(model_dir, manifest)
    return load_state(network, path, f"model {manifest.name}", device)


def load_state(network: NetworkT, path: Path, owner: str, device: torch.device) -> NetworkT:
    """``network`` with the (already verified) safetensors weights ``path``, on ``device``,
    in eval mode; ``owner`` ("gate radiograph-view") names it when the file does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        network.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, ValueError, SafetensorError) as exc:
        raise ManifestError(f"{owner}: {path} does not fit: {exc}") from exc
    network.to(device).eval()
    return network


def require_hu_window(manifest: Manifest, channels: int) -> None:
    """CT models need an HU window and the network's channel count in ``[input]``."""
    spec = manifest.input
    if spec.window_center is None or spec.window_width is None or spec.channels != channels:
        raise ManifestError(
            f"model {manifest.name}: [input] needs window_center, window_width and "
            f"channels = {channels}"
        )


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class SliceScore:
    """The per-slice probability of a volume model for one source frame."""

    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None  # 1-based frame of a multi-frame instance; None for single-frame
    probability: float


@dataclass(frozen=True)
class SeriesResult:
    """A volume model's output for one series: per-slice and exam-level probabilities.

    ``slices`` are in canonical volume order (superior to inferior); ``exam`` holds every
    ``level = "exam"`` label of the manifest, already made consistent by the model.
    """

    series_uid: str
    image_label: str  # the manifest's image-level label, e.g. "pe_present_on_image"
    slices: tuple[SliceScore, ...]
    exam: dict[str, float]


class VolumeClassifier(ABC):
    """A warm model that reads a whole CT volume and classifies the exam (the PE model is one)."""

    manifest: Manifest
    device: torch.device

    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path, device: torch.device) -> VolumeClassifier:
        """Load the manifest and verified weights from ``model_dir`` onto ``device``."""

    @abstractmethod
    def classify(self, volume: Volume) -> SeriesResult:
        """Classify one canonical-orientation volume (see :mod:`pacsnode.volumes`)."""


@dataclass
class SegmentationResult:
    """A volume segmenter's output for one series, on the source voxel grid.

    ``masks`` maps every ``level = "segment"`` label of the manifest to a boolean array of
    exactly ``volume.array.shape`` in canonical orientation (see :mod:`pacsnode.volumes`):
    no resampling is left to the writers, so ``volume.to_source(mask)`` gives the frame of
    each source slice. Segments may overlap (a kidney segment includes its tumour and cysts,
    as in KiTS19).
    """

    series_uid: str
    volume: Volume
    masks: dict[str, np.ndarray]


class VolumeSegmenter(ABC):
    """A warm model that segments a whole CT volume (the kidney cascade is one)."""

    manifest: Manifest
    device: torch.device

    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path, device: torch.device) -> VolumeSegmenter:
        """Load the manifest and verified weights from ``model_dir`` onto ``device``."""

    @abstractmethod
    def segment(self, volume: Volume) -> SegmentationResult:
        """Segment one canonical-orientation volume; masks on the volume's own grid."""
