"""Synthetic CT series as DICOM files (test-only): one anatomy, any acquisition geometry.

The anatomy is given as a HU array in the canonical orientation of
:mod:`pacsnode.volumes` (``hu[k, j, i]``: i toward patient left (+x), j toward posterior
(+y), k from superior to inferior (-z)); :func:`make_ct_series` re-slices it, by flips
and axis permutations only, into the frames a scanner would write for the requested
patient position and image orientation, with ImagePositionPatient and
ImageOrientationPatient that put every pixel back where it was. Reading the series back
must therefore give ``hu`` and :func:`canonical_affine` exactly.

Options produce the bad series the volume code must refuse (a skipped slice, gantry tilt,
a slice with another orientation, a localizer); anything else, mutate the datasets
before :func:`save_series`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")

AXIAL_IOP: dict[str, tuple[float, ...]] = {
    "HFS": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "FFS": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "HFP": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "FFP": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
}
"""ImageOrientationPatient of an axial acquisition in each patient position."""

CORONAL_IOP = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL_IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

# patient axis (x, y, z) -> (canonical array axis, +1 if the index runs along +axis)
_CANONICAL = {0: (2, 1.0), 1: (1, 1.0), 2: (0, -1.0)}

Mutator = Callable[[Dataset, int], None]
Vector = Sequence[float] | np.ndarray


def default_origin(shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float, float]:
    """LPS of canonical voxel (0, 0, 0) that centres the volume on x and y; the top at z=100."""
    k, j, i = shape
    sk, sj, si = spacing
    return (-(i - 1) * si / 2, -(j - 1) * sj / 2, 100.0)


def canonical_affine(
    spacing: Sequence[float],
    origin: Sequence[float],
    rotation: np.ndarray | None = None,
) -> np.ndarray:
    """Ground-truth affine of the canonical array: LPS = origin + R @ (i si, j sj, -k sk)."""
    sk, sj, si = spacing
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([si, sj, -sk])
    affine[:3, 3] = origin
    return affine


def rotation_about(axis: Vector, degrees: float) -> np.ndarray:
    """Rotation matrix (Rodrigues) for an oblique acquisition."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = math.radians(degrees)
    cross = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * cross + (1 - math.cos(t)) * (cross @ cross)


def _axis(vector: np.ndarray) -> tuple[int, float]:
    index = int(np.argmax(np.abs(vector)))
    return index, float(np.sign(vector[index]))


def _fmt(values: Iterable[float]) -> list[float]:
    """Values DS can hold (16 characters) without losing what the tests compare."""
    return [float(f"{v:.10g}") + 0.0 for v in values]


def _common(
    ds: Dataset,
    *,
    sop_class: UID,
    sop_uid: str,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    patient_position: str,
    instance_number: int,
) -> None:
    """Patient, study, series, frame of reference, equipment and SOP common modules."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = "PHANTOM^CT"
    ds.PatientID = "CT0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "A0001"
    ds.StudyDescription = "CT chest (synthetic phantom)"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 2
    ds.SeriesDescription = "Axial 2.5 (synthetic phantom)"
    ds.PatientPosition = patient_position
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "pacsnode phantom"
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.BodyPartExamined = "CHEST"


def _pixel_module(ds: Dataset, stored: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2").tobytes()


def _file(sop_class: UID, sop_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)


def _seq(**attributes: object) -> DicomSequence:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return DicomSequence([item])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _single_frame(
    stored: np.ndarray,
    *,
    position: Vector,
    orientation: Vector,
    pixel_spacing: Sequence[float],
    thickness: float,
    image_type: Sequence[str],
    rescale: tuple[float, float],
    gantry_tilt: float,
    **common: object,
) -> FileDataset:
    ds = _file(CT_IMAGE_STORAGE, str(common["sop_uid"]))
    _common(ds, sop_class=CT_IMAGE_STORAGE, **common)  # type: ignore[arg-type]
    ds.ImageType = list(image_type)
    ds.ImagePositionPatient = _fmt(position)
    ds.ImageOrientationPatient = _fmt(orientation)
    ds.PixelSpacing = _fmt(pixel_spacing)
    ds.SliceThickness = thickness
    ds.KVP = 120
    ds.ImageLaterality = "U"
    ds.GantryDetectorTilt = gantry_tilt
    ds.RescaleSlope = rescale[0]
    ds.RescaleIntercept = rescale[1]
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    _pixel_module(ds, stored)
    return ds


def _enhanced(
    stored: np.ndarray,
    *,
    positions: Sequence[Vector],
    orientations: Sequence[Vector],
    in_stack: Sequence[int],
    pixel_spacing: Sequence[float],
    thickness: float,
    image_type: Sequence[str],
    rescale: tuple[float, float],
    gantry_tilt: float,
    **common: object,
) -> FileDataset:
    """One Enhanced CT instance: geometry per frame, the rest in the shared groups."""
    ds = _file(ENHANCED_CT_IMAGE_STORAGE, str(common["sop_uid"]))
    _common(ds, sop_class=ENHANCED_CT_IMAGE_STORAGE, **common)  # type: ignore[arg-type]
    flavor = "VOLUME" if image_type[2] == "AXIAL" else image_type[2]
    frame_type = [image_type[0], image_type[1], flavor, "NONE"]
    ds.ImageType = frame_type
    ds.ManufacturerModelName = "phantom"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1"
    ds.AcquisitionDateTime = "20240102101500"
    ds.AcquisitionDuration = 1.0
    ds.ContentQualification = "RESEARCH"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.NumberOfFrames = len(positions)
    ds.AcquisitionContextSequence = DicomSequence([])
    stack_id = "1"
    ds.DimensionOrganizationType = "3D"
    organization_uid = generate_uid()
    ds.DimensionOrganizationSequence = _seq(DimensionOrganizationUID=organization_uid)
    dims = []
    for pointer in ("StackID", "InStackPositionNumber"):
        dim = Dataset()
        dim.DimensionOrganizationUID = organization_uid
        dim.DimensionIndexPointer = pointer
        dim.FunctionalGroupPointer = "FrameContentSequence"
        dims.append(dim)
    ds.DimensionIndexSequence = DicomSequence(dims)

    shared = Dataset()
    shared.PixelMeasuresSequence = _seq(PixelSpacing=_fmt(pixel_spacing), SliceThickness=thickness)
    shared.PixelValueTransformationSequence = _seq(
        RescaleSlope=rescale[0], RescaleIntercept=rescale[1], RescaleType="HU"
    )
    shared.FrameVOILUTSequence = _seq(WindowCenter=40, WindowWidth=400)
    shared.FrameAnatomySequence = _seq(
        FrameLaterality="U",
        AnatomicRegionSequence=DicomSequence([_code("51185008", "SCT", "Chest")]),
    )
    shared.IrradiationEventIdentificationSequence = _seq(IrradiationEventUID=generate_uid())
    shared.CTAcquisitionTypeSequence = _seq(
        AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO"
    )
    details = dict(
        DataCollectionDiameter=500.0,
        RotationDirection="CW",
        RevolutionTime=0.5,
        SingleCollimationWidth=0.625,
        TotalCollimationWidth=40.0,
        TableHeight=150.0,
        GantryDetectorTilt=gantry_tilt,
    )
    shared.CTAcquisitionDetailsSequence = _seq(**details)
    shared.CTTableDynamicsSequence = _seq(
        TableSpeed=80.0, TableFeedPerRotation=40.0, SpiralPitchFactor=1.0
    )
    shared.CTGeometrySequence = _seq(
        DistanceSourceToDetector=1000.0, DistanceSourceToDataCollectionCenter=550.0
    )
    shared.CTReconstructionSequence = _seq(
        ReconstructionAlgorithm="FILTER_BACK_PROJ",
        ConvolutionKernel="STANDARD",
        ConvolutionKernelGroup="SOFT_TISSUE",
        ReconstructionDiameter=360.0,
        ReconstructionAngle=360.0,
        ReconstructionPixelSpacing=_fmt(pixel_spacing),
        ImageFilter="NONE",
    )
    shared.CTExposureSequence = _seq(
        ExposureTimeInms=500.0,
        XRayTubeCurrentInmA=200.0,
        ExposureInmAs=100.0,
        ExposureModulationType="NONE",
    )
    shared.CTXRayDetailsSequence = _seq(
        KVP=120.0, FilterType="BODY", FilterMaterial=["ALUMINUM"], FocalSpots=[1.0]
    )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    frames = []
    for number, (position, orientation, stack_position) in enumerate(
        zip(positions, orientations, in_stack, strict=True), start=1
    ):
        item = Dataset()
        item.FrameContentSequence = _seq(
            FrameAcquisitionNumber=number,
            FrameReferenceDateTime="20240102101500",
            FrameAcquisitionDateTime="20240102101500",
            FrameAcquisitionDuration=0.5,
            StackID=stack_id,
            InStackPositionNumber=stack_position,
            DimensionIndexValues=[1, stack_position],
        )
        item.PlanePositionSequence = _seq(ImagePositionPatient=_fmt(position))
        item.PlaneOrientationSequence = _seq(ImageOrientationPatient=_fmt(orientation))
        item.CTPositionSequence = _seq(
            TablePosition=float(position[2]),
            ReconstructionTargetCenterPatient=[0.0, 0.0, float(position[2])],
            DataCollectionCenterPatient=[0.0, 0.0, float(position[2])],
        )
        item.CTImageFrameTypeSequence = _seq(
            FrameType=frame_type,
            PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME",
            VolumeBasedCalculationTechnique="NONE",
        )
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    _pixel_module(ds, stored)
    return ds


def _stored(hu: np.ndarray, rescale: tuple[float, float]) -> np.ndarray:
    slope, intercept = rescale
    stored = np.round((hu - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError("hu: values do not fit int16 with this rescale")
    if not np.array_equal(stored * slope + intercept, hu):
        raise ValueError(f"hu: values are not exact multiples of slope {slope} from {intercept}")
    return stored.astype(np.int16)


def make_ct_series(
    hu: np.ndarray,
    spacing: Sequence[float] = (2.5, 0.8, 0.7),
    *,
    patient_position: str = "HFS",
    iop: Sequence[float] | None = None,
    reverse: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    enhanced: bool = False,
    study_uid: str | None = None,
    series_uid: str | None = None,
    origin: Sequence[float] | None = None,
    rotation: np.ndarray | None = None,
    rescale: tuple[float, float] = (1.0, -1024.0),
    skip: Iterable[int] = (),
    tilt_deg: float = 0.0,
    write_tilt_tag: bool = True,
    mixed_orientation: bool = False,
    localizer: bool = False,
) -> list[FileDataset]:
    """The datasets of one CT series holding ``hu`` (canonical ``[k, j, i]``, ``spacing`` mm).

    ``iop`` defaults to the axial orientation of ``patient_position``; the slices are
    acquired against the normal (superior to inferior for head first, inferior to
    superior for feet first), or along it with ``reverse``. ``shuffle`` permutes
    InstanceNumbers, frames and the returned order. ``rotation`` turns the whole
    acquisition about canonical voxel (0, 0, 0) (an oblique scan). ``skip`` drops
    acquisition indices; ``tilt_deg`` shears positions along the column direction like a
    tilted gantry (and writes GantryDetectorTilt unless ``write_tilt_tag`` is false);
    ``mixed_orientation`` turns the last acquired slice's IOP by 2°; ``localizer`` adds
    a coronal scout (a separate instance; an Enhanced CT one when ``enhanced``).
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu: shape {hu.shape} is not (k, j, i)")
    if patient_position not in AXIAL_IOP:
        raise ValueError(f"patient_position: {patient_position!r} not one of {sorted(AXIAL_IOP)}")
    rng = np.random.default_rng(seed)
    origin = default_origin(hu.shape, spacing) if origin is None else tuple(origin)
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    iop = AXIAL_IOP[patient_position] if iop is None else tuple(iop)
    row = np.asarray(iop[:3], dtype=np.float64)
    col = np.asarray(iop[3:], dtype=np.float64)
    normal = np.cross(row, col)
    travel = normal if reverse else -normal
    p_row, s_row = _axis(row)
    p_col, s_col = _axis(col)
    p_slice, s_slice = _axis(travel)
    if len({p_row, p_col, p_slice}) != 3:
        raise ValueError(f"iop: {iop} is not made of two different patient axes")
    # source axes (slice, row index, column index) and whether each runs against the canonical
    parts = [(p_slice, s_slice), (p_col, s_col), (p_row, s_row)]
    axes = [_CANONICAL[p][0] for p, _ in parts]
    against = [s * _CANONICAL[p][1] < 0 for p, s in parts]
    source = hu.transpose(axes)
    source = source[tuple(slice(None, None, -1) if a else slice(None) for a in against)]
    stored = _stored(source, rescale)
    sizes = source.shape
    spacing_of = {axis: float(spacing[axis]) for axis in range(3)}
    canon_step = np.array([-spacing_of[0], spacing_of[1], spacing_of[2]])  # (k, j, i) -> LPS sign

    def lps(index: Sequence[int]) -> np.ndarray:
        """LPS of the source voxel (slice, row, column)."""
        canon = [0, 0, 0]
        for position, (axis, backwards) in enumerate(zip(axes, against, strict=True)):
            canon[axis] = sizes[position] - 1 - index[position] if backwards else index[position]
        k, j, i = canon
        offset = np.array([i * canon_step[2], j * canon_step[1], k * canon_step[0]])
        return np.asarray(origin, dtype=np.float64) + rot @ offset

    slice_spacing = spacing_of[axes[0]]
    column_direction = rot @ col
    skipped = set(skip)
    kept = [m for m in range(sizes[0]) if m not in skipped]
    tilt_tag = tilt_deg if write_tilt_tag else 0.0
    positions, orientations = [], []
    for m in kept:
        position = lps((m, 0, 0))
        if tilt_deg:
            position = (
                position + math.tan(math.radians(tilt_deg)) * m * slice_spacing * column_direction
            )
        orientation = np.concatenate([rot @ row, rot @ col])
        if mixed_orientation and m == kept[-1]:
            turn = rotation_about(rot @ normal, 2.0)
            orientation = np.concatenate([turn @ rot @ row, turn @ rot @ col])
        positions.append(position)
        orientations.append(orientation)

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    common: dict[str, object] = dict(
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=generate_uid(),
        patient_position=patient_position,
    )
    pixel_spacing = (spacing_of[axes[1]], spacing_of[axes[2]])
    image_type = ("ORIGINAL", "PRIMARY", "AXIAL")
    order = list(rng.permutation(len(kept))) if shuffle else list(range(len(kept)))
    out: list[FileDataset] = []
    if enhanced:
        out.append(
            _enhanced(
                stored[[kept[o] for o in order]],
                positions=[positions[o] for o in order],
                orientations=[orientations[o] for o in order],
                in_stack=[int(o) + 1 for o in order],
                pixel_spacing=pixel_spacing,
                thickness=slice_spacing,
                image_type=image_type,
                rescale=rescale,
                gantry_tilt=tilt_tag,
                sop_uid=generate_uid(),
                instance_number=1,
                **common,
            )
        )
    else:
        numbers = rng.permutation(len(kept)) + 1 if shuffle else np.arange(1, len(kept) + 1)
        for index in order:
            out.append(
                _single_frame(
                    stored[kept[index]],
                    position=positions[index],
                    orientation=orientations[index],
                    pixel_spacing=pixel_spacing,
                    thickness=slice_spacing,
                    image_type=image_type,
                    rescale=rescale,
                    gantry_tilt=tilt_tag,
                    sop_uid=generate_uid(),
                    instance_number=int(numbers[index]),
                    **common,
                )
            )
    if localizer:
        out.append(_localizer(hu, spacing, origin, rot, rescale, enhanced, common))
    return out


def _localizer(
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    rot: np.ndarray,
    rescale: tuple[float, float],
    enhanced: bool,
    common: dict[str, object],
) -> FileDataset:
    """A coronal scout (mean along y) of the same anatomy, in the same series."""
    k, j, i = hu.shape
    image = np.round(hu.mean(axis=1) / rescale[0]) * rescale[0]
    stored = _stored(image, rescale)
    centre = np.asarray(origin, dtype=np.float64) + rot @ np.array(
        [0.0, (j - 1) / 2 * spacing[1], 0.0]
    )
    orientation = np.concatenate([rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 0, -1.0])])
    image_type = ("ORIGINAL", "PRIMARY", "LOCALIZER")
    shared: dict[str, object] = dict(
        pixel_spacing=(spacing[0], spacing[2]),
        thickness=float(j * spacing[1]),
        image_type=image_type,
        rescale=rescale,
        gantry_tilt=0.0,
        sop_uid=generate_uid(),
        instance_number=1000,
        **common,
    )
    if enhanced:
        return _enhanced(
            stored[None],
            positions=[centre],
            orientations=[orientation],
            in_stack=[1],
            **shared,  # type: ignore[arg-type]
        )
    return _single_frame(stored, position=centre, orientation=orientation, **shared)  # type: ignore[arg-type]


def save_series(datasets: Sequence[Dataset], out_dir: Path) -> list[Path]:
    """Write ``datasets`` as ``ct_NNNN.dcm`` in the given order; returns the paths in that order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(datasets, start=1):
        path = out_dir / f"ct_{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_ct_series(
    out_dir: Path,
    hu: np.ndarray,
    spacing: Sequence[float] = (2.5, 0.8, 0.7),
    *,
    mutate: Mutator | None = None,
    **options: object,
) -> list[Path]:
    """:func:`make_ct_series` (same ``options``) written to ``out_dir`` as ``ct_NNNN.dcm``.

    ``mutate(ds, index)`` edits each dataset before it is saved; paths come back in the
    order of the datasets (random with ``shuffle``; a localizer comes last).
    """
    datasets = make_ct_series(hu, spacing, **options)  # type: ignore[arg-type]
    if mutate is not None:
        for index, ds in enumerate(datasets):
            mutate(ds, index)
    return save_series(datasets, out_dir)
