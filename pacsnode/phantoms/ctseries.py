"""Write a canonical HU volume as an axial CT Image Storage series (shared by the CT phantoms).

The phantoms render in the canonical orientation of :mod:`pacsnode.volumes` (``hu[k, j, i]``,
i toward patient left (+x), j posterior (+y), k superior to inferior (-z)) on a grid given
by its voxel-centre coordinates. :func:`write_ct_series` turns such a volume into one file
per slice in any of the four axial patient positions (HFS/FFS/HFP/FFP), flipping the pixel
rows and columns and choosing ImagePositionPatient / ImageOrientationPatient so that
``pacsnode.volumes`` reads back the same canonical array in every geometry.

UIDs are derived (:func:`pacsnode.uids.derive_uid`) from ``uid_root`` and the arguments, so a
rewrite of the same phantom gives the same files; the derivation strings are part of the
contract (tests and trained weights refer to files written by the CTPA phantom).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from pacsnode.uids import derive_uid

PATIENT_POSITIONS: dict[str, tuple[float, float, float, float, float, float]] = {
    "HFS": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "FFS": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "HFP": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "FFP": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
}
"""ImageOrientationPatient of an axial slice for each PatientPosition."""

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
HU_MIN, HU_MAX = -1024.0, 3071.0


@dataclass(frozen=True)
class PhantomStudy:
    """Patient, General Study and General Equipment values shared by a phantom's series."""

    seed: int
    study_uid: str
    patient_id: str | None = None  # None or "": ``PH<id_prefix><seed>``
    patient_name: str = "PHANTOM^CT"
    accession_number: str | None = None  # None: ``<id_prefix><seed>``; "" stays empty
    study_date: str | None = None  # None: derived from the seed
    study_description: str = "CT (synthetic phantom)"
    model_name: str = "ct-phantom"
    id_prefix: str = "CT"


def set_patient_study(ds: Dataset, study: PhantomStudy) -> None:
    """Patient, General Study and General Equipment attributes (Type 1/2 filled)."""
    seed = study.seed
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id or f"PH{study.id_prefix}{seed % 10**8:08d}"
    ds.PatientBirthDate = f"19{40 + seed % 50:02d}0{1 + seed % 9}15"
    ds.PatientSex = ["F", "M"][seed % 2]
    ds.StudyInstanceUID = study.study_uid
    date = study.study_date or f"2024{1 + seed % 12:02d}{1 + seed % 28:02d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = "093000"
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "093512"
    ds.AccessionNumber = (
        study.accession_number
        if study.accession_number is not None
        else f"{study.id_prefix}{seed % 10**8:08d}"
    )
    ds.ReferringPhysicianName = "REFERRER^PHANTOM"
    ds.StudyID = f"{seed % 10**6}"
    ds.StudyDescription = study.study_description
    ds.Manufacturer = "pacsnode phantom"
    ds.ManufacturerModelName = study.model_name
    ds.InstitutionName = "pacsnode"
    ds.StationName = "PHANTOM"
    ds.SoftwareVersions = "1"
    ds.DeviceSerialNumber = "0001"


def new_ct_file(sop_uid: str) -> FileDataset:
    """An empty CT Image Storage file (Explicit VR Little Endian) with its SOP identity."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    return ds


def set_pixels(ds: Dataset, hu: np.ndarray, rescale_type: str | None = "HU") -> None:
    """Image Pixel module: ``hu`` rounded to int16 stored values, Rescale Intercept -1024."""
    stored = np.clip(np.rint(hu) + 1024.0, -32768, 32767).astype(np.int16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    if rescale_type:
        ds.RescaleType = rescale_type
    ds.PixelData = stored.tobytes()


def check_patient_position(patient_position: str) -> None:
    """Raise ``ValueError`` naming ``patient_position`` unless it is HFS, FFS, HFP or FFP."""
    if patient_position not in PATIENT_POSITIONS:
        raise ValueError(
            f"patient_position: {patient_position!r} is not one of {sorted(PATIENT_POSITIONS)}"
        )


@dataclass(frozen=True)
class CtSeriesFiles:
    """What :func:`write_ct_series` wrote."""

    paths: tuple[Path, ...]  # in the order written (shuffled when asked)
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    canonical_uids: tuple[str, ...]  # SOP Instance UIDs of hu[0], hu[1], ... (superior first)


def write_ct_series(
    out_dir: Path,
    hu: np.ndarray,
    x_mm: np.ndarray,
    y_mm: np.ndarray,
    z_mm: np.ndarray,
    *,
    seed: int,
    uid_root: str,
    slice_spacing_mm: float,
    patient_position: str = "HFS",
    shuffle: bool = True,
    slice_thickness_mm: float | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 2,
    series_description: str = "CT",
    convolution_kernel: str = "B30f",
    contrast_agent: str | None = None,
    body_part: str = "",
    kvp: str = "120",
    window: tuple[float, float] = (40.0, 400.0),
    patient_id: str | None = None,
    patient_name: str = "PHANTOM^CT",
    accession_number: str | None = None,
    study_date: str | None = None,
    study_description: str = "CT (synthetic phantom)",
    model_name: str = "ct-phantom",
    id_prefix: str = "CT",
) -> CtSeriesFiles:
    """Write the canonical volume ``hu`` (k, j, i) as one axial CT image per slice.

    ``x_mm`` / ``y_mm`` are the ascending pixel-centre coordinates of columns i and rows j
    (equal spacing), ``z_mm`` the descending slice positions ``slice_spacing_mm`` apart (the
    spacing goes into the series UID exactly as given). Pixels are int16 with Rescale
    Intercept -1024 / Slope 1. Head first acquisitions are numbered from the top, feet first
    from the bottom; ``shuffle`` writes the files in a seeded random order under opaque
    names. Default UIDs: study ``derive_uid(f"{uid_root}-study", seed)``, series from the
    seed, position, grid and series number, instances from the series UID and the canonical
    slice index, frame of reference from the study UID. ``contrast_agent=None`` omits the
    Contrast/Bolus module; ``""`` writes an empty ContrastBolusAgent. ``window`` is
    (WindowCenter, WindowWidth).
    """
    check_patient_position(patient_position)
    slices, rows, columns = hu.shape
    if (x_mm.shape, y_mm.shape, z_mm.shape) != ((columns,), (rows,), (slices,)):
        raise ValueError(
            f"hu: shape {hu.shape} does not match the coordinates "
            f"(z {z_mm.shape}, y {y_mm.shape}, x {x_mm.shape})"
        )
    iop = PATIENT_POSITIONS[patient_position]
    flip_cols = iop[0] < 0  # row direction toward patient right: columns run -x
    flip_rows = iop[4] < 0  # column direction toward anterior: rows run -y
    sp = float(x_mm[1] - x_mm[0])
    x0 = float(x_mm[-1] if flip_cols else x_mm[0])
    y0 = float(y_mm[-1] if flip_rows else y_mm[0])
    study_uid = study_uid or derive_uid(f"{uid_root}-study", str(seed))
    series_uid = series_uid or derive_uid(
        f"{uid_root}-series",
        str(seed),
        patient_position,
        str(rows),
        str(slices),
        repr(float(slice_spacing_mm)),
        str(series_number),
    )
    for_uid = frame_of_reference_uid or derive_uid(f"{uid_root}-for", study_uid)
    study = PhantomStudy(
        seed=seed,
        study_uid=study_uid,
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_date=study_date,
        study_description=study_description,
        model_name=model_name,
        id_prefix=id_prefix,
    )
    head_first = patient_position.startswith("HF")
    # acquisition order: head first scans from the top, feet first from the bottom
    order = list(range(slices)) if head_first else list(range(slices - 1, -1, -1))
    instance_of = {k: n + 1 for n, k in enumerate(order)}
    uids = [derive_uid(f"{uid_root}-instance", series_uid, str(k)) for k in range(slices)]
    write_order = list(order)
    if shuffle:
        np.random.default_rng([seed, slices, 0x5F]).shuffle(write_order)
    out_dir.mkdir(parents=True, exist_ok=True)
    thickness = float(slice_thickness_mm if slice_thickness_mm is not None else slice_spacing_mm)
    paths = []
    for k in write_order:
        ds = new_ct_file(uids[k])
        set_patient_study(ds, study)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.BodyPartExamined = body_part
        ds.PatientPosition = patient_position
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = instance_of[k]
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BurnedInAnnotation = "NO"
        ds.KVP = kvp
        ds.SliceThickness = round(thickness, 4)
        ds.ConvolutionKernel = convolution_kernel
        ds.ScanOptions = "HELICAL"
        ds.DataCollectionDiameter = 500.0
        ds.ReconstructionDiameter = round(sp * columns, 3)
        ds.GantryDetectorTilt = 0.0
        ds.TableHeight = 150.0
        ds.RotationDirection = "CW"
        ds.ExposureTime = 500
        ds.XRayTubeCurrent = 200
        ds.PatientOrientation = ""
        if contrast_agent is not None:
            ds.ContrastBolusAgent = contrast_agent
            if contrast_agent:
                ds.ContrastBolusRoute = "IV"
        z = float(z_mm[k])
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(z, 4)]
        ds.ImageOrientationPatient = list(iop)
        ds.PixelSpacing = [round(sp, 6), round(sp, 6)]
        ds.SliceLocation = round(z, 4)
        ds.WindowCenter = _ds_number(window[0])
        ds.WindowWidth = _ds_number(window[1])
        img = hu[k]
        if flip_rows:
            img = img[::-1]
        if flip_cols:
            img = img[:, ::-1]
        set_pixels(ds, img)
        name = f"{derive_uid(uids[k])[5:21]}.dcm" if shuffle else f"ct_{instance_of[k]:04d}.dcm"
        path = out_dir / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return CtSeriesFiles(
        paths=tuple(paths),
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=for_uid,
        canonical_uids=tuple(uids),
    )


def _ds_number(value: float) -> int | float:
    """An integral window value as int, so it is written as the CTPA phantom always wrote it."""
    return int(value) if float(value).is_integer() else float(value)
