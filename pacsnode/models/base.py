"""The contract between the worker and a model implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydicom.dataset import Dataset

from pacsnode.manifest import Manifest


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
