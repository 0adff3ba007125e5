"""The contract between the worker and a model implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset

from pacsnode.manifest import Manifest
from pacsnode.volumes import Volume


@dataclass(frozen=True)
class ImageResult:
    """Per-image classifier output: probability of every manifest label, in manifest order."""

    sop_instance_uid: str
    sop_class_uid: str
    probabilities: dict[str, float]


class ImageClassifier(ABC):
    """A warm, batched per-image classifier (the CXR model is one)."""

    manifest: Manifest
    device: torch.device

    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path, device: torch.device) -> ImageClassifier:
        """Load the manifest and verified weights from ``model_dir`` onto ``device``."""

    @abstractmethod
    def predict(self, datasets: Sequence[Dataset]) -> list[ImageResult]:
        """Classify the images (full datasets with pixels) in one batched pass.

        Raises :class:`pacsnode.errors.InputError` naming the instance when one
        cannot be decoded or preprocessed.
        """


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
