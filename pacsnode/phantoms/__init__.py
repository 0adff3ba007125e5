"""Synthetic DICOM phantoms with known ground truth, for training, tests and demos.

Nothing here is a real patient; every phantom is rendered from a seed.
"""

from pacsnode.phantoms.cxr import (
    CHEXNET_LABELS,
    RENDERED_FINDINGS,
    make_cxr_dataset,
    render,
    write_phantom_set,
)

__all__ = [
    "CHEXNET_LABELS",
    "RENDERED_FINDINGS",
    "make_cxr_dataset",
    "render",
    "write_phantom_set",
]
