"""CT kidney / renal tumour / cyst segmentation: a two-stage 3D U-Net cascade (KiTS19 layout).

Pipeline (:meth:`KidneySegmenter.segment`; training uses the same helpers):

1. the canonical HU volume goes through the abdomen window (manifest ``[input]``, WL 100 /
   WW 600, scaled to [0, 1]) and is resampled (trilinear, ``align_corners=False``) to about
   :data:`COARSE_MM` per voxel;
2. stage 1, a small 3D U-Net (MONAI ``UNet``), gives the probability of kidney foreground
   (kidney, tumour or cyst); its connected components of at least :data:`MIN_REGION_ML`,
   largest first, at most :data:`MAX_REGIONS`, each give a box in **source** voxel indices,
   widened by :data:`MARGIN_MM`;
3. stage 2, a second 3D U-Net, reads each box resampled to :data:`FINE_MM` per voxel with
   sliding-window inference (:data:`PATCH` voxels) and gives background / kidney / tumour /
   cyst probabilities, which are resampled back onto the box's source voxels with the same
   interpolation convention and arg-maxed there, so the result lies on the source grid;
4. inside each box, every connected foreground component of at least :data:`MIN_KIDNEY_ML`
   is one kidney; its side is decided in patient coordinates: the LPS x of its centroid
   (through ``volume.affine``) against the x of the body's centroid (voxels above −170 HU on
   the coarse grid). +x is the patient's left. Tumour and cyst voxels are reported only
   inside such a kidney component (KiTS convention: the kidney segment includes them);
   anything in smaller, isolated components is dropped.

The shipped weights were trained only on synthetic phantoms (``pacsnode.models.train_kidney``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from scipy import ndimage
from torch import nn

from pacsnode.errors import ManifestError
from pacsnode.manifest import InputSpec, Manifest, load_manifest
from pacsnode.models.base import (
    SegmentationResult,
    VolumeSegmenter,
    load_weights,
    require_hu_window,
)
from pacsnode.volumes import Volume

SEGMENT_LABELS: tuple[str, ...] = ("left_kidney", "right_kidney", "kidney_tumour", "kidney_cyst")
"""The manifest's segment labels, in order."""
FINE_CLASSES: tuple[str, ...] = ("background", "kidney", "tumour", "cyst")
"""Stage-2 output channels."""

COARSE_MM = 4.0
FINE_MM = 2.0
PATCH = (64, 64, 64)
"""Stage-2 sliding-window patch (k, j, i) in fine voxels (128 mm)."""
COARSE_MULTIPLE = 8
"""Stage-1 input sides are padded to a multiple of this (three stride-2 levels)."""
MARGIN_MM = 16.0
GROW_MM = 16.0
MAX_GROWTH = 2
MIN_REGION_ML = 8.0
MAX_REGIONS = 2
MIN_KIDNEY_ML = 5.0
BODY_WINDOWED = 0.05
"""Windowed value above which a coarse voxel is body (WL 100 / WW 600: about −170 HU)."""


# ---------------------------------------------------------------- network


def coarse_net() -> UNet:
    """Stage 1: whole abdomen at ~4 mm, two outputs (background, kidney foreground)."""
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(8, 16, 32, 64),
        strides=(2, 2, 2),
        num_res_units=1,
        norm="instance",
    )


def fine_net() -> UNet:
    """Stage 2: kidney region at ~2 mm, :data:`FINE_CLASSES` outputs."""
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=len(FINE_CLASSES),
        channels=(16, 32, 64, 128),
        strides=(2, 2, 2),
        num_res_units=1,
        norm="instance",
    )


class KidneyNetwork(nn.Module):
    """The architecture the weights belong to: ``coarse.*`` and ``fine.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.coarse = coarse_net()
        self.fine = fine_net()


# ---------------------------------------------------------------- preprocessing


def window(hu: np.ndarray | torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """HU to float32 [0, 1] through the manifest's window (a new tensor)."""
    if spec.window_center is None or spec.window_width is None:
        raise ValueError("input spec has no HU window (window_center/window_width)")
    t = torch.as_tensor(np.ascontiguousarray(hu, dtype=np.float32))
    lo = spec.window_center - spec.window_width / 2.0
    return (t - lo).div_(spec.window_width).clamp_(0.0, 1.0)


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], mm: float) -> tuple[int, ...]:
    """Voxel counts of the same extent at ``mm`` per voxel (at least 1)."""
    return tuple(max(1, round(n * float(s) / mm)) for n, s in zip(shape, spacing, strict=True))


def resample(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``(c, k, j, i)`` to ``(c, *shape)``: trilinear, ``align_corners=False`` (voxel
    boundaries of input and output coincide at the ends), so a box maps back exactly."""
    if tuple(t.shape[1:]) == tuple(shape):
        return t
    return F.interpolate(t[None], size=shape, mode="trilinear", align_corners=False)[0]


def pad_to_multiple(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad ``(c, k, j, i)`` at the far end of each axis to a multiple of ``multiple``."""
    pads: list[int] = []
    for n in reversed(t.shape[1:]):
        pads += [0, (-n) % multiple]
    return F.pad(t, pads) if any(pads) else t


def coarse_input(
    hu: np.ndarray, spacing: tuple[float, float, float], spec: InputSpec
) -> torch.Tensor:
    """Windowed volume at ~:data:`COARSE_MM`, ``(1, k, j, i)`` (not padded)."""
    shape = target_shape(hu.shape, spacing, COARSE_MM)
    return resample(window(hu, spec)[None], shape)


def fine_input(
    hu: np.ndarray, spacing: tuple[float, float, float], spec: InputSpec
) -> torch.Tensor:
    """Windowed region at ~:data:`FINE_MM`, ``(1, k, j, i)``."""
    shape = target_shape(hu.shape, spacing, FINE_MM)
    return resample(window(hu, spec)[None], shape)


def source_box(
    coarse_slices: tuple[slice, ...],
    coarse_shape: tuple[int, ...],
    source_shape: tuple[int, ...],
    spacing: tuple[float, float, float],
) -> tuple[slice, ...]:
    """The source-voxel box covering a coarse box, widened by :data:`MARGIN_MM`."""
    box = []
    for sl, nc, ns, sp in zip(coarse_slices, coarse_shape, source_shape, spacing, strict=True):
        scale = ns / nc
        margin = math.ceil(MARGIN_MM / float(sp))
        lo = max(0, math.floor(sl.start * scale) - margin)
        hi = min(ns, math.ceil(sl.stop * scale) + margin)
        box.append(slice(lo, hi))
    return tuple(box)


# ---------------------------------------------------------------- serving


class KidneySegmenter(VolumeSegmenter):
    """Warm cascade: both nets on ``device``, float32, eval mode."""

    def __init__(self, manifest: Manifest, network: KidneyNetwork, device: torch.device):
        self.manifest = manifest
        self.network = network
        self.device = device

    @classmethod
    def load(cls, model_dir: Path, device: torch.device) -> KidneySegmenter:
        manifest = load_manifest(model_dir)
        names = [label.name for label in manifest.segment_labels]
        if sorted(names) != sorted(SEGMENT_LABELS):
            raise ManifestError(
                f"model {manifest.name}: segment labels {names} differ from {list(SEGMENT_LABELS)}"
            )
        require_hu_window(manifest, channels=1)
        network = load_weights(KidneyNetwork(), model_dir, manifest, device)
        return cls(manifest, network, device)

    def coarse_probability(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 1 on ``(1, k, j, i)``: kidney-foreground probability of the same shape."""
        shape = x.shape[1:]
        padded = pad_to_multiple(x, COARSE_MULTIPLE).to(self.device)
        logits = self.network.coarse(padded[None])[0]
        prob = torch.softmax(logits, dim=0)[1]
        return prob[: shape[0], : shape[1], : shape[2]].float().cpu()

    def fine_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 2 on ``(1, k, j, i)`` by sliding window: ``(4, k, j, i)`` probabilities."""
        logits = sliding_window_inference(
            x[None].to(self.device),
            roi_size=PATCH,
            sw_batch_size=self.manifest.batch_size,
            predictor=self.network.fine,
            overlap=0.25,
            mode="gaussian",
        )
        assert isinstance(logits, torch.Tensor)
        return torch.softmax(logits[0], dim=0).float().cpu()

    def segment(self, volume: Volume) -> SegmentationResult:
        hu = volume.array
        if hu.ndim != 3:
            raise ValueError(f"series {volume.series_uid}: expected a 3D volume, got {hu.shape}")
        spec = self.manifest.input
        spacing = volume.spacing
        shape = tuple(int(n) for n in hu.shape)
        masks = {name: np.zeros(shape, dtype=bool) for name in SEGMENT_LABELS}
        with torch.inference_mode():
            coarse = coarse_input(hu, spacing, spec)
            prob = self.coarse_probability(coarse).numpy()
            cshape = prob.shape
            cspacing = tuple(
                float(n) * float(s) / c for n, s, c in zip(shape, spacing, cshape, strict=True)
            )
            body = coarse[0].numpy() > BODY_WINDOWED
            midline_x = self._midline_x(volume, body, cshape)
            labels, n = ndimage.label(prob > 0.5)
            voxel_ml = float(np.prod(cspacing)) / 1000.0
            sizes = ndimage.sum_labels(np.ones_like(labels), labels, range(1, n + 1))
            order = [int(i) + 1 for i in np.argsort(-sizes) if sizes[i] * voxel_ml >= MIN_REGION_ML]
            objects = ndimage.find_objects(labels)
            for lab in order[:MAX_REGIONS]:
                box = source_box(objects[lab - 1], cshape, shape, spacing)
                self._segment_box(volume, box, midline_x, masks)
        return SegmentationResult(series_uid=volume.series_uid, volume=volume, masks=masks)

    @staticmethod
    def _midline_x(volume: Volume, body: np.ndarray, cshape: tuple[int, ...]) -> float:
        """LPS x of the body's centroid (coarse body mask mapped to source indices)."""
        if not body.any():
            centre = (np.asarray(volume.array.shape, dtype=np.float64) - 1.0) / 2.0
        else:
            c = np.asarray(ndimage.center_of_mass(body), dtype=np.float64)
            scale = np.asarray(volume.array.shape, dtype=np.float64) / np.asarray(cshape)
            centre = (c + 0.5) * scale - 0.5
        return _patient_x(volume.affine, centre)

    def _fine_labels(self, volume: Volume, box: tuple[slice, ...]) -> np.ndarray:
        """Stage 2 on one source box: the arg-max class of every source voxel in it."""
        crop = volume.array[box]
        x = fine_input(crop, volume.spacing, self.manifest.input)
        prob = self.fine_probabilities(x)
        crop_shape = tuple(int(n) for n in crop.shape)
        return resample(prob, crop_shape).argmax(dim=0).numpy().astype(np.uint8)

    def _grown_box(
        self, volume: Volume, box: tuple[slice, ...]
    ) -> tuple[tuple[slice, ...], np.ndarray]:
        """Stage 2 on ``box``, widened by :data:`GROW_MM` on every face the foreground
        touches (a large exophytic tumour can reach beyond the stage-1 region), at most
        :data:`MAX_GROWTH` times."""
        label = self._fine_labels(volume, box)
        for _ in range(MAX_GROWTH):
            grown = list(box)
            for axis, (sl, n, sp) in enumerate(
                zip(box, volume.array.shape, volume.spacing, strict=True)
            ):
                step = math.ceil(GROW_MM / float(sp))
                first = np.take(label, 0, axis=axis).any()
                last = np.take(label, -1, axis=axis).any()
                lo = max(0, sl.start - step) if first else sl.start
                hi = min(n, sl.stop + step) if last else sl.stop
                grown[axis] = slice(lo, hi)
            if tuple(grown) == box:
                break
            box = tuple(grown)
            label = self._fine_labels(volume, box)
        return box, label

    def _segment_box(
        self,
        volume: Volume,
        box: tuple[slice, ...],
        midline_x: float,
        masks: dict[str, np.ndarray],
    ) -> None:
        box, label = self._grown_box(volume, box)
        fg = label > 0
        comps, n = ndimage.label(fg)
        if n == 0:
            return
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        sizes = ndimage.sum_labels(fg, comps, range(1, n + 1))
        centres = ndimage.center_of_mass(fg, comps, range(1, n + 1))
        offset = np.asarray([s.start for s in box], dtype=np.float64)
        for idx in range(n):
            if sizes[idx] * voxel_ml < MIN_KIDNEY_ML:
                continue
            comp = comps == idx + 1
            x_mm = _patient_x(volume.affine, np.asarray(centres[idx]) + offset)
            side = "left_kidney" if x_mm > midline_x else "right_kidney"
            masks[side][box] |= comp
            masks["kidney_tumour"][box] |= comp & (label == 2)
            masks["kidney_cyst"][box] |= comp & (label == 3)


def _patient_x(affine: np.ndarray, kji: np.ndarray) -> float:
    """LPS x (mm) of a canonical (k, j, i) position."""
    k, j, i = (float(v) for v in kji)
    return float((np.asarray(affine, dtype=np.float64) @ np.array([i, j, k, 1.0]))[0])
