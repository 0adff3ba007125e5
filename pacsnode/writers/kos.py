"""Key Object Selection writer: the most suspicious slices of a positive CT series.

A volume model's SR (:func:`pacsnode.writers.sr.build_series_report`) says *whether*; this
document says *where*: PACS viewers show a Key Object Selection as "key images" that open
straight at the flagged slices. One document per (source series, model name, model
version), in the source study, in a series of its own whose UIDs come from
``result_uids(..., kind="ko")``, so a resend replaces it. A negative exam gets none.

Content (TID 2010 "Key Object Selection")::

    Document title = DCM 113000 "Of Interest" (CID 7010)
    Observer context: device = the model (the same device observer as the SR)
    Key Object Description (TEXT): why these slices, where they are, their probabilities;
        the DEMO disclaimer when ``manifest.synthetic``
    IMAGE -> each selected instance, superior to inferior

"Of Interest" because the selection is a machine's, unverified: the intent-specific titles
of CID 7010 ("For Referring Provider", "For Surgery", "For Teaching"...) say a person chose
the images for that audience, which nobody did. Only slices at or above the image label's
threshold are selected, so every key image is one the model calls positive.

highdicom's ``KeyObjectSelection`` references whole instances (it has no frame numbers),
so a multi-frame source is referenced once, as the instance; the description names the
frames. Built by highdicom constructors and never patched afterwards; as with the SR,
highdicom stamps the instance creation date/time and its own contribution time itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pacsnode.manifest import LabelSpec, Manifest
from pacsnode.models.base import SeriesResult
from pacsnode.writers.sr import (
    DEMO_DISCLAIMER,
    ScoredSlice,
    check_sources,
    device_observer_context,
    document_character_set,
    document_provenance,
    match_slices,
    result_uids,
    series_description,
)

DOCUMENT_TITLE: Code = codes.cid7010.OfInterest
"""DCM 113000 "Of Interest" (CID 7010); see the module docstring for why not another."""


def select_key_slices(
    scored: Sequence[ScoredSlice], label: LabelSpec, max_images: int
) -> list[ScoredSlice]:
    """The ``max_images`` most probable slices at or above the label's threshold, in
    anatomical order; ties go to the more superior slice."""
    positive = [s for s in scored if s.probability >= label.threshold]
    top = sorted(positive, key=lambda s: (-s.probability, s.index))[:max_images]
    return sorted(top, key=lambda s: s.index)


def build_key_images(
    sources: Sequence[Dataset],
    result: SeriesResult,
    manifest: Manifest,
    *,
    max_images: int = 5,
    series_number: int = 7002,
    now: datetime | None = None,
) -> hd.ko.KeyObjectSelectionDocument | None:
    """Flag the most suspicious slices of a positive series; None when no slice is positive
    or the image label is not reported.

    Parameters
    ----------
    sources
        Headers of the series' instances (pixels not needed); patient and study come from
        ``sources[0]``, the character set is chosen as for the SR.
    result
        The volume model's :class:`SeriesResult`; every scored slice must be one of
        ``sources``.
    manifest
        The model's manifest; ``result.image_label``'s threshold decides which slices are
        positive, and a label that is not ``reported`` gets no key images (as it gets no
        slice summary in the SR).
    max_images
        At most this many slices are flagged: the most probable positive ones.
    series_number
        SeriesNumber of the key image series (fixed, so a resend looks the same).
    now
        Content and series time; defaults to the local wall clock.

    Raises
    ------
    ValueError
        When ``sources`` is empty or spans several series, ``max_images`` is below 1, or
        ``result`` does not match ``sources``.
    InvalidDatasetError
        When the first source lacks an attribute the document must carry.
    """
    if max_images < 1:
        raise ValueError(f"max_images: {max_images}; at least 1 key image is needed")
    if len(sources) == 0:
        raise ValueError("sources: at least one instance is needed to select key images")
    first = check_sources(sources, "KOS")
    label, scored = match_slices(sources, result, manifest)
    if not label.reported:  # only reported labels reach the PACS, key images included
        return None
    chosen = select_key_slices(scored, label, max_images)
    if not chosen:
        return None
    referenced = list({str(s.source.SOPInstanceUID): s.source for s in chosen}.values())
    description = _description(scored, chosen, label, manifest)
    content = hd.ko.KeyObjectSelection(
        document_title=DOCUMENT_TITLE,
        referenced_objects=referenced,
        observer_device_context=device_observer_context(manifest),
        description=description,
    )
    series_uid, instance_uid = result_uids(result.series_uid, manifest, "ko")
    now = datetime.now() if now is None else now
    return hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        **document_provenance(manifest, now),
        series_description=series_description(manifest, "key images"),
        specific_character_set=document_character_set(
            first, manifest, [description, DOCUMENT_TITLE.meaning]
        ),
    )


def _description(
    scored: Sequence[ScoredSlice],
    chosen: Sequence[ScoredSlice],
    label: LabelSpec,
    manifest: Manifest,
) -> str:
    """Key Object Description: what was selected, by whom, why, and where each slice is."""
    meaning = label.code.meaning if label.code is not None else label.name
    positives = sum(1 for s in scored if s.probability >= label.threshold)
    slices = "; ".join(f"{s.describe()} p={s.probability:.2f}" for s in chosen)
    selected = "the slice" if len(chosen) == 1 else f"the {len(chosen)} slices"
    text = (
        f"Key images of model {manifest.name} {manifest.version}: {selected} with the highest "
        f"probability of {meaning} among the {positives} of {len(scored)} slices at or above "
        f"{label.threshold:g}, superior to inferior: {slices}."
    )
    return f"{text} {DEMO_DISCLAIMER}." if manifest.synthetic else text
