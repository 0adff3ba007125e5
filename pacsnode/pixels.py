"""DICOM pixels to a float display image, shared by every model.

One path for every model and for training: modality LUT, then the dataset's own
VOI (LUT or window) when it has one, else robust percentile scaling; MONOCHROME1
is inverted so that bright always means dense. Problems are reported as
:class:`~pacsnode.errors.InputError` naming the SOP Instance UID.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from pacsnode.errors import InputError

MAX_DIMENSION = 16384
"""Rows or Columns above this are refused before decoding (a 16k² 16-bit frame is 512 MiB)."""

PERCENTILES = (0.5, 99.5)


def _uid(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "<no SOPInstanceUID>"))


def _check_geometry(ds: Dataset) -> tuple[int, int, int, int]:
    """Validate the Image Pixel attributes and return rows, columns, samples, bits allocated."""
    uid = _uid(ds)
    if "PixelData" not in ds:
        raise InputError(f"instance {uid}: no Pixel Data")
    try:
        rows = int(ds.Rows)
        cols = int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1))
        bits_allocated = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(
            f"instance {uid}: missing or invalid Image Pixel attribute: {exc}"
        ) from exc
    if not (0 < rows <= MAX_DIMENSION and 0 < cols <= MAX_DIMENSION):
        raise InputError(
            f"instance {uid}: image size {rows}x{cols} outside 1..{MAX_DIMENSION}; refusing to decode"
        )
    if frames != 1:
        raise InputError(f"instance {uid}: {frames} frames; a single-frame image is required")
    if samples not in (1, 3):
        raise InputError(f"instance {uid}: SamplesPerPixel {samples} not supported")
    if bits_allocated not in (8, 16, 32):
        raise InputError(f"instance {uid}: BitsAllocated {bits_allocated} not supported")
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None or not tsyntax.is_compressed:
        expected = rows * cols * samples * bits_allocated // 8
        actual = len(ds.PixelData)
        # native Pixel Data is padded to an even length
        if actual not in (expected, expected + (expected % 2)):
            raise InputError(
                f"instance {uid}: Pixel Data has {actual} bytes, {rows}x{cols}x{samples} "
                f"at {bits_allocated} bits needs {expected}"
            )
    return rows, cols, samples, bits_allocated


def _window(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """First Window Center/Width of ``ds`` applied to ``arr``, mapped to [0, 1] (PS3.3 C.11.2)."""
    center_elem = ds["WindowCenter"]
    width_elem = ds["WindowWidth"]
    center = float(center_elem.value[0] if center_elem.VM > 1 else center_elem.value)
    width = float(width_elem.value[0] if width_elem.VM > 1 else width_elem.value)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return np.clip((arr - center) / max(width, 1e-6) + 0.5, 0.0, 1.0)
    if width < 1:
        raise InputError(f"instance {_uid(ds)}: Window Width {width} < 1")
    return np.clip((arr - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)


def robust_scale(arr: np.ndarray) -> np.ndarray:
    """Map the 0.5–99.5 percentile range of ``arr`` to [0, 1], clipping the tails."""
    lo, hi = np.percentile(arr, PERCENTILES)
    if hi - lo < 1e-6:
        lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1e-6:
        return np.zeros(arr.shape, dtype=np.float32)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


_DISPLAY_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "ModalityLUTSequence",
)
_CACHE = "_pacsnode_display"


def to_display_array(ds: Dataset) -> np.ndarray:
    """Return the single frame of ``ds`` as a 2D float32 array in [0, 1], bright = dense.

    The array is kept on ``ds`` while its Pixel Data and display attributes stay the same:
    the content gate, the model and the heatmap writer read the same radiograph, and
    decode and window it once (about 14 ms at 2048x2048). Callers must not modify it.
    """
    pixels = ds.get("PixelData")
    key = tuple(repr(ds.get(k)) for k in _DISPLAY_KEYWORDS)
    cached = ds.__dict__.get(_CACHE)
    if cached is not None and cached[0] is pixels and cached[1] == key:
        return cached[2]  # type: ignore[no-any-return]
    image = _display(ds)
    ds.__dict__[_CACHE] = (pixels, key, image)  # holds Pixel Data: its identity is the key
    return image


def _display(ds: Dataset) -> np.ndarray:
    uid = _uid(ds)
    _, _, samples, _ = _check_geometry(ds)
    try:
        raw = ds.pixel_array
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        raise InputError(f"instance {uid}: cannot decode Pixel Data: {exc}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples == 3:
        # pydicom converts YBR to RGB; colour CXRs are rare, use luminance
        rgb = raw.astype(np.float32)
        gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        return robust_scale(gray)
    if raw.ndim != 2:
        raise InputError(f"instance {uid}: decoded pixels have shape {raw.shape}, expected 2D")
    try:
        values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    except Exception as exc:
        raise InputError(f"instance {uid}: invalid Modality LUT / rescale: {exc}") from exc

    if ds.get("VOILUTSequence"):
        try:
            lut_item = ds.VOILUTSequence[0]
            out = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64)
            lut_bits = int(lut_item.LUTDescriptor[2])
        except Exception as exc:
            raise InputError(f"instance {uid}: invalid VOI LUT Sequence: {exc}") from exc
        image = np.clip(out / float(2**lut_bits - 1), 0.0, 1.0)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        image = _window(values, ds)
    else:
        image = robust_scale(values)

    if photometric == "MONOCHROME1":
        image = 1.0 - image
    elif photometric != "MONOCHROME2":
        raise InputError(f"instance {uid}: PhotometricInterpretation {photometric} not supported")
    return np.ascontiguousarray(image, dtype=np.float32)
