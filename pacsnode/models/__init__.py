"""Model implementations, selected by the ``kind`` in each folder's manifest."""

from __future__ import annotations

from pathlib import Path

import torch

from pacsnode.errors import ManifestError
from pacsnode.manifest import load_manifest
from pacsnode.models.base import ImageClassifier, VolumeClassifier, VolumeSegmenter

Model = ImageClassifier | VolumeClassifier | VolumeSegmenter


def _implementations() -> dict[str, type[Model]]:
    from pacsnode.models.cxr import ChexNetClassifier
    from pacsnode.models.kidney import KidneySegmenter
    from pacsnode.models.pe import PEClassifier

    return {
        "cxr-densenet121": ChexNetClassifier,
        "ct-pe-2d-gru": PEClassifier,
        "ct-kidney-cascade-unet": KidneySegmenter,
    }


def load_model(model_dir: Path, device: torch.device) -> Model:
    """Load the model in ``model_dir`` with the implementation its manifest names."""
    manifest = load_manifest(model_dir)
    impls = _implementations()
    if manifest.kind not in impls:
        raise ManifestError(
            f"{model_dir}: unknown model kind {manifest.kind!r} (known: {', '.join(sorted(impls))})"
        )
    return impls[manifest.kind].load(model_dir, device)
