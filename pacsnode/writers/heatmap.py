"""Heatmap writer: where the chest X-ray model looked, as images any PACS viewer shows.

For every reported finding at or above its threshold the classifier returns a Grad-CAM map
(:mod:`pacsnode.models.cxr`); this module turns each into a Secondary Capture image in the
source study, in one series "pacsnode heatmaps ..." per (source series, model name, model
version):

* pixels: the source radiograph as the model read it (:func:`pacsnode.pixels.to_display_array`:
  the dataset's own window or VOI LUT, MONOCHROME1 inverted so bright is dense), in grey, with
  the map as a colour overlay (blue -> cyan -> green -> yellow -> red; transparent where the
  map is below :data:`OVERLAY_FLOOR`), RGB 8 bit;
* geometry: the SOURCE pixel grid (same rows, columns, pixel spacing, Patient Orientation), so
  the viewer shows it the same way round and the same size as the source, and a pixel of the
  SC is the source pixel at the same row and column;
* text burned in at the top edge (finding, probability, threshold, model) and at the bottom
  edge (:data:`DISCLAIMER`, plus the demo notice for a synthetic model); Burned In Annotation
  is YES;
* encoding: JPEG baseline by default (highdicom's, quality 95: 1.5 MB instead of 12 MB for
  a 2048x2048 radiograph, flagged Lossy Image Compression 01 with its ratio), which about
  halves the time to result of a radiograph with several findings (README, Speed);
  uncompressed RGB on request (``[outputs] heatmap_encoding``). The diagnostic image stays
  the source.

UIDs are derived (:func:`heatmap_uids`) from the source series and instance, the model's name
and version and the finding, so a resend replaces each image and a new model version makes a
new series. A Parametric Map of the same values is not written: highdicom 0.28 cannot build
one on a projection radiograph, which has no frame of reference (see ``[outputs]`` in
:mod:`pacsnode.config`).

highdicom's ``SCImage`` has no parameter for Burned In Annotation, Source Image Sequence or
Derivation Description; :class:`HeatmapImage` is its subclass whose constructor adds them, the
way highdicom's own IOD classes extend ``SOPClass``, so nothing is patched after construction.
highdicom stamps the instance creation and secondary capture date/time itself; everything else
is a function of the inputs and ``now``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from datetime import datetime
from typing import Any, cast

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from pacsnode.config import HeatmapEncoding
from pacsnode.manifest import LabelSpec, Manifest
from pacsnode.models.base import ImageResult, heatmap_on_source
from pacsnode.pixels import to_display_array
from pacsnode.uids import derive_uid
from pacsnode.writers.sr import (
    LONG_STRING_MAX,
    check_sources,
    document_character_set,
    document_provenance,
)

SERIES_NUMBER = 7010
"""SeriesNumber of the heatmap series (the SR is 7001), fixed so a resend looks the same."""

DISCLAIMER = "AI-generated, not for diagnosis"
DEMO_NOTICE = "demo model trained on synthetic phantoms"
OUTSIDE_RANGE_WARNING = "OUTSIDE THE MODEL'S VALIDATED INPUT RANGE"

OVERLAY_FLOOR = 0.2
"""Map values below this are not coloured: the radiograph stays readable around the hot spot."""
OVERLAY_OPACITY = 0.6
"""Opacity of the colour at the map's maximum; it falls linearly to 0 at the floor."""

_COLOUR_STOPS = np.array(
    [[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
)
"""Blue, cyan, green, yellow, red at map values 0, 1/4, 1/2, 3/4, 1 (a jet-like map ending in
pure red, so the hottest pixel is the reddest)."""

_DERIVATION = "Grad-CAM heatmap of {finding} by {model}, overlaid on the source radiograph"


def heatmap_uids(
    source_series_uid: str, source_sop_uid: str, manifest: Manifest, label: str
) -> tuple[str, str]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of the heatmap of ``label`` on one source image.

    One series per (source series, model name, version); one instance per source image and
    finding: a resend replaces, a new model version gives a new series.
    """
    base = (source_series_uid, manifest.name, manifest.version, "heatmap")
    return derive_uid(*base, "series"), derive_uid(*base, source_sop_uid, label, "instance")


def heatmap_series_description(manifest: Manifest) -> str:
    """SeriesDescription of the heatmap series; says so when the model is a synthetic demo."""
    if manifest.synthetic:
        text = f"pacsnode heatmaps {manifest.name} (DEMO, not for clinical use)"
        return text if len(text) <= LONG_STRING_MAX else "pacsnode heatmaps (DEMO)"
    return f"pacsnode heatmaps {manifest.name} {manifest.version}"[:LONG_STRING_MAX]


def positive_findings(result: ImageResult, manifest: Manifest) -> list[LabelSpec]:
    """Reported labels, in manifest order, that are at or above threshold and have a map."""
    return [
        label
        for label in manifest.reported_labels
        if label.name in result.heatmaps
        and result.probabilities.get(label.name, -1.0) >= label.threshold
    ]


class HeatmapImage(hd.sc.SCImage):
    """A Secondary Capture image that shows a model's heatmap on its source image.

    highdicom's ``SCImage`` plus what it has no parameter for: in General Image, Burned In
    Annotation YES (the finding and the disclaimer are in the pixels), Source Image Sequence
    (the radiograph, DCM 121322 "Source image for image processing operation"), Derivation
    Description and Lossy Image Compression (00, or 01 with ratio and method when the
    transfer syntax is JPEG baseline); in General Series, the source's Body Part Examined
    (without it dciodvfy takes the body part for a paired one and wants Laterality) and
    Laterality (the source's; present, possibly empty, when the body part is not named).
    """

    def __init__(
        self,
        *args: Any,
        source_image: Dataset,
        derivation_description: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        body_part = source_image.get("BodyPartExamined")
        if body_part:
            self.BodyPartExamined = body_part
        laterality = _series_laterality(source_image)
        if laterality or not body_part:
            self.Laterality = laterality
        self.BurnedInAnnotation = "YES"
        if self.file_meta.TransferSyntaxUID == JPEGBaseline8Bit:
            stored = len(self.PixelData)
            raw = int(self.Rows) * int(self.Columns) * int(self.SamplesPerPixel)
            self.LossyImageCompression = "01"
            self.LossyImageCompressionRatio = f"{raw / stored:.2f}"
            self.LossyImageCompressionMethod = "ISO_10918_1"
        else:
            self.LossyImageCompression = "00"
        self.DerivationDescription = derivation_description
        reference = Dataset()
        reference.ReferencedSOPClassUID = source_image.SOPClassUID
        reference.ReferencedSOPInstanceUID = source_image.SOPInstanceUID
        reference.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
        ]
        self.SourceImageSequence = [reference]


def _series_laterality(source: Dataset) -> str:
    """Laterality (General Series, R or L) of the SC: the source's, else its Image Laterality
    when that is R or L, else empty.

    Type 2C, required when the body part is paired. dciodvfy takes a source without Body Part
    Examined for a paired one, so the SC of such a source carries it, empty when unknown.
    """
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword) or "").strip().upper()
        if value in ("R", "L"):
            return value
    return ""


def build_heatmap_images(
    source: Dataset,
    result: ImageResult,
    manifest: Manifest,
    *,
    image_index: int = 0,
    series_number: int = SERIES_NUMBER,
    now: datetime | None = None,
    encoding: HeatmapEncoding = "jpeg",
    pool: Executor | None = None,
    outside: str | None = None,
) -> dict[str, HeatmapImage]:
    """One heatmap SC per positive finding of ``result`` on ``source`` (see the module
    docstring), keyed by label name in manifest order; empty when nothing is Present.

    Parameters
    ----------
    source
        The classified image, with its pixels (decoded once for all its findings).
    result
        The classifier's result for ``source``, with heatmaps
        (``predict(..., heatmaps=True)``); findings without a map are skipped.
    manifest
        The model's manifest: label codes, thresholds, name and version.
    image_index
        0-based position of ``source`` in its series' job; with the finding's place among
        the reported labels it fixes the InstanceNumber, so a resend numbers alike.
    series_number, now
        SeriesNumber of the heatmap series; content and series date/time (default: now).
    encoding
        ``"jpeg"`` (baseline, lossy) or ``"uncompressed"`` (see the module docstring).
    pool
        Builds the findings' images concurrently when given (overlay, text and JPEG encoding
        release the GIL for most of their time); the result is the same either way.
    outside
        Why the image lies outside the model's validated input range, when a failed gate
        let it through (``on_gate_failure = "flag"``): burned in under the finding.

    Raises
    ------
    ValueError
        When ``result`` is of another instance.
    InvalidDatasetError
        When ``source`` lacks an attribute the SC must carry.
    InputError
        When the source pixels cannot be decoded.
    """
    check_sources([source], "heatmap SC")
    if result.sop_instance_uid != str(source.SOPInstanceUID):
        raise ValueError(
            f"result: instance {result.sop_instance_uid} is not the source {source.SOPInstanceUID}"
        )
    labels = positive_findings(result, manifest)
    if not labels:
        return {}
    display = to_display_array(source)
    grey = _to_uint8(display)
    rows, columns = grey.shape
    reported = [label.name for label in manifest.reported_labels]

    def image(label: LabelSpec) -> HeatmapImage:
        probability = result.probabilities[label.name]
        heat = heatmap_on_source(result.heatmaps[label.name], rows, columns)
        rgb = overlay(grey, heat)
        meaning = label.code.meaning if label.code else label.name
        burn_in(
            rgb,
            top=[
                f"{meaning}: {probability:.2f} (threshold {label.threshold:.2f})",
                f"Grad-CAM, {manifest.name} {manifest.version}",
                *([f"{OUTSIDE_RANGE_WARNING}: {outside}"] if outside else []),
            ],
            bottom=[DISCLAIMER, DEMO_NOTICE] if manifest.synthetic else [DISCLAIMER],
        )
        number = 1 + image_index * len(reported) + reported.index(label.name)
        return _sc_image(
            source, rgb, manifest, label, meaning, number, series_number, now, encoding
        )

    built = pool.map(image, labels) if pool is not None else map(image, labels)
    return {label.name: sc for label, sc in zip(labels, built, strict=True)}


def overlay(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """RGB uint8 of the ``grey`` image (uint8) with ``heat`` ([0, 1], same shape) on top.

    Grey everywhere, then one table lookup per pixel of the box around the map's coloured
    part: the blend of every (map level, grey level) pair is precomputed (256 x 256 x 3
    bytes), so a 2048x2048 image costs a copy and a gather over the hot box.
    """
    if grey.shape != heat.shape:
        raise ValueError(f"heat: shape {heat.shape} differs from the image's {grey.shape}")
    level = _to_uint8(heat)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    hot = level >= int(np.ceil(OVERLAY_FLOOR * 255.0))
    rows = np.flatnonzero(hot.any(axis=1))
    if rows.size == 0:
        return rgb
    cols = np.flatnonzero(hot[rows[0] : rows[-1] + 1].any(axis=0))
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    index = (level[box].astype(np.uint16) << 8) | grey[box]
    np.take(_blend_table(), index, axis=0, out=rgb[box])
    return rgb


def burn_in(rgb: np.ndarray, *, top: Sequence[str], bottom: Sequence[str]) -> None:
    """Write ``top`` lines at the top left and ``bottom`` lines at the bottom left of ``rgb``
    (in place), white on a darkened box; the font shrinks until the longest line fits."""
    rows, columns = rgb.shape[:2]
    size = max(12, rows // 48)
    longest = max([*top, *bottom], key=len, default="")
    font = ImageFont.load_default(size)
    while size > 6 and font.getlength(longest) > columns - size:
        size -= max(1, size // 8)
        font = ImageFont.load_default(size)
    for lines, at_top in ((top, True), (bottom, False)):
        if lines:
            _text_box(rgb, lines, font, size, at_top)


def _sc_image(
    source: Dataset,
    rgb: np.ndarray,
    manifest: Manifest,
    label: LabelSpec,
    meaning: str,
    instance_number: int,
    series_number: int,
    now: datetime | None,
    encoding: HeatmapEncoding,
) -> HeatmapImage:
    now = datetime.now() if now is None else now
    jpeg = encoding == "jpeg"
    series_uid, sop_uid = heatmap_uids(
        str(source.SeriesInstanceUID), str(source.SOPInstanceUID), manifest, label.name
    )
    description = heatmap_series_description(manifest)
    derivation = _DERIVATION.format(finding=meaning, model=f"{manifest.name} {manifest.version}")
    return HeatmapImage.from_ref_dataset(
        source,
        rgb,
        photometric_interpretation=(
            hd.PhotometricInterpretationValues.YBR_FULL_422
            if jpeg
            else hd.PhotometricInterpretationValues.RGB
        ),
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        **document_provenance(manifest, now),
        # highdicom annotates the spacing as ints; it writes them as DS
        pixel_spacing=cast("tuple[int, int] | None", _pixel_spacing(source)),
        patient_orientation=patient_orientation(source),
        transfer_syntax_uid=JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian,
        series_description=description,
        specific_character_set=document_character_set(
            source, manifest, [description, derivation, meaning]
        ),
        source_image=source,
        derivation_description=derivation[:1024],
    )


def patient_orientation(source: Dataset) -> tuple[str, str]:
    """Patient Orientation of the SC: the source's, so a viewer shows both the same way round.

    A value with several letters (oblique, e.g. ``LP``) keeps its first, most significant
    letter (PS3.3 C.7.6.1.1.1), which highdicom's enumeration can hold. Without a usable
    value it is derived from Image Orientation (Patient) when the source has one, else the
    chest-radiograph display convention the model was trained on (``L\\F``: patient's
    right on the viewer's left, feet down).
    """
    value = source.get("PatientOrientation")
    letters = set("APLRHF")
    if value is not None and not isinstance(value, str) and len(value) == 2:
        first = [str(v).strip().upper()[:1] for v in value]
        if all(v and v in letters for v in first):
            return first[0], first[1]
    cosines = source.get("ImageOrientationPatient")
    if cosines is not None and len(cosines) == 6:
        try:
            row, column = np.array(cosines[:3], float), np.array(cosines[3:], float)
            return _direction_letter(row), _direction_letter(column)
        except (TypeError, ValueError):
            pass
    return "L", "F"


def _direction_letter(direction: np.ndarray) -> str:
    """The patient direction (LPS) a unit vector points to most: L/R, P/A or H/F."""
    axis = int(np.argmax(np.abs(direction)))
    positive = direction[axis] > 0
    return ("L", "P", "H")[axis] if positive else ("R", "A", "F")[axis]


def _pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    """Pixel Spacing of the source, else its Imager Pixel Spacing: what the viewer measures
    with on the source, so distances and aspect match it."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value is not None and len(value) == 2:
            try:
                spacing = (float(value[0]), float(value[1]))
            except (TypeError, ValueError):
                continue
            if spacing[0] > 0 and spacing[1] > 0:
                return spacing
    return None


def _to_uint8(values: np.ndarray) -> np.ndarray:
    scaled = np.clip(values, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)
    return scaled.astype(np.uint8)


def _blend_table() -> np.ndarray:
    """``table[level * 256 + grey]``: the RGB of grey level ``grey`` under map level ``level``."""
    level = np.arange(256, dtype=np.float64) / 255.0
    stops = np.linspace(0.0, 1.0, len(_COLOUR_STOPS))
    colour = np.stack([np.interp(level, stops, _COLOUR_STOPS[:, c]) for c in range(3)], axis=1)
    alpha = OVERLAY_OPACITY * np.clip((level - OVERLAY_FLOOR) / (1.0 - OVERLAY_FLOOR), 0.0, 1.0)
    grey = np.arange(256, dtype=np.float64)[None, :, None]
    blend = grey * (1.0 - alpha[:, None, None]) + 255.0 * colour[:, None, :] * alpha[:, None, None]
    return np.round(blend).astype(np.uint8).reshape(256 * 256, 3)


def _text_box(
    rgb: np.ndarray,
    lines: Sequence[str],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    size: int,
    at_top: bool,
) -> None:
    rows, columns = rgb.shape[:2]
    margin = max(2, size // 3)
    line_height = int(size * 1.25)
    height = min(rows, line_height * len(lines) + 2 * margin)
    width = min(columns, int(max(font.getlength(line) for line in lines)) + 2 * margin)
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for k, line in enumerate(lines):
        draw.text((margin, margin + k * line_height), line, fill=255, font=font)
    ink = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    box = rgb[:height, :width] if at_top else rgb[rows - height :, :width]
    darkened = box.astype(np.float32) * 0.3
    box[...] = (darkened + (255.0 - darkened) * ink + 0.5).astype(np.uint8)
