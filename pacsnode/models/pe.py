"""CT pulmonary embolism model (placeholder until the model work lands)."""

from __future__ import annotations

from pathlib import Path

import torch

from pacsnode.models.base import SeriesResult, VolumeClassifier
from pacsnode.volumes import Volume


class PEClassifier(VolumeClassifier):
    @classmethod
    def load(cls, model_dir: Path, device: torch.device) -> PEClassifier:
        raise NotImplementedError

    def classify(self, volume: Volume) -> SeriesResult:
        raise NotImplementedError
