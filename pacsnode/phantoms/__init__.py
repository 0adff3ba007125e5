"""Synthetic DICOM phantoms with known ground truth, for training, tests and demos.

Nothing here is a real patient; every phantom is rendered from a seed.
"""

from pacsnode.phantoms.ctpa import (
    CTPA_EXAM_LABELS,
    CTPA_IMAGE_LABEL,
    CtpaCase,
    CtpaSeries,
    make_ctpa_case,
    render_canonical,
    write_ctpa_series,
    write_scout,
)
from pacsnode.phantoms.cxr import (
    CHEXNET_LABELS,
    RENDERED_FINDINGS,
    finding_regions,
    make_cxr_dataset,
    render,
    render_with_regions,
    write_phantom_set,
)

__all__ = [
    "CHEXNET_LABELS",
    "CTPA_EXAM_LABELS",
    "CTPA_IMAGE_LABEL",
    "RENDERED_FINDINGS",
    "CtpaCase",
    "CtpaSeries",
    "finding_regions",
    "make_ctpa_case",
    "make_cxr_dataset",
    "render",
    "render_canonical",
    "render_with_regions",
    "write_ctpa_series",
    "write_phantom_set",
    "write_scout",
]
