"""Model implementations, selected by the ``kind`` in each folder's manifest."""

from __future__ import annotations

from pathlib import Path

import torch

from pacsnode.errors import ManifestError
from pacsnode.manifest import load_manifest
from pacsnode.models.base import ImageClassifier


def _implementations() -> dict[str, type[ImageClassifier]]:
    from pacsnode.models.cxr import ChexNetClassifier

    return {"cxr-densenet121": ChexNetClassifier}


def load_model(model_dir: Path, device: torch.device) -> ImageClassifier:
    """Load the model in ``model_dir`` with the implementation its manifest names."""
    manifest = load_manifest(model_dir)
    impls = _implementations()
    if manifest.kind not in impls:
        raise ManifestError(
            f"{model_dir}: unknown model kind {manifest.kind!r} (known: {', '.join(sorted(impls))})"
        )
    return impls[manifest.kind].load(model_dir, device)
