"""CT content gate: which body region a CT volume shows, and whether contrast was given.

Headers lie (a BodyPartExamined of CHEST on an abdomen, a missing or wrong
ContrastBolusAgent); this gate looks only at the pixels of the assembled
:class:`~pacsnode.volumes.Volume` and never at a header.

Input (one path for training and serving, :func:`gate_planes`):

1. :func:`sample_slices` picks ``[input] slices`` axial planes evenly along k (the centres of
   equal bins; every plane when there are fewer), so any number of slices from one works and
   a partial scan (a CTPA of the chest only, an abdomen with lung bases) is read as it is;
2. each plane is resampled (antialiased bilinear) to ``[input] mm_per_pixel`` whatever its
   pixel spacing, so anatomy keeps its size in mm, and pasted on a ``size`` × ``size``
   canvas of air centred on the body (the centroid of pixels above ``body_threshold_hu``);
3. the HU canvas goes through the ``[input] windows`` (centre, width), one channel each,
   scaled to [0, 1].

A 2D MONAI ``ResNet`` (basic blocks, one per stage) reads each plane and gives a pooled
embedding, three region logits (chest / abdomen / other) and one contrast logit.
Probabilities are averaged over the planes; :attr:`CtContent.features` is the embedding
averaged over the same planes (for an out-of-distribution score).

The folder holds ``gate.toml`` (validated by :class:`GateSpec`), the weights, whose sha256 the
loader checks, ``metrics.json`` and ``MODEL_CARD.md``. The shipped weights were trained only on
synthetic phantoms (:mod:`pacsnode.gates.train_ct`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from pacsnode.errors import ManifestError
from pacsnode.gates import GATE_FILE, GateVerdict, verified_gate_weights
from pacsnode.manifest import WeightsSpec, load_toml
from pacsnode.models.base import load_state
from pacsnode.volumes import Volume

REGIONS: tuple[str, ...] = ("chest", "abdomen", "other")
"""Region head outputs, in order (``gate.toml`` must list them so)."""
HU_MIN, HU_MAX = -1024.0, 3071.0


# ---------------------------------------------------------------- gate.toml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GateInput(_Strict):
    """How a volume becomes network planes (see the module docstring)."""

    slices: int = Field(12, ge=1)
    size: int = Field(176, ge=32)
    mm_per_pixel: float = Field(2.5, gt=0)
    windows: list[tuple[float, float]] = [(-600.0, 1500.0), (40.0, 400.0), (500.0, 2000.0)]
    """(centre, width) in HU, one input channel each."""
    body_threshold_hu: float = -400.0

    @field_validator("windows")
    @classmethod
    def _widths_positive(cls, value: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if not value or any(width <= 0 for _, width in value):
            raise ValueError("windows needs at least one (centre, width) with width > 0")
        return value


class GateNetwork(_Strict):
    """The MONAI ResNet's shape and its global pooling."""

    block_inplanes: list[int] = [24, 48, 96, 192]
    layers: list[int] = [1, 1, 1, 1]
    pooling: Literal["avg", "avg+max"] = "avg+max"
    """``avg+max`` concatenates global average and max pooling: the region is in the whole
    plane, contrast often in a few pixels (a vessel) that averaging would dilute."""


class GateSpec(_Strict):
    """The parsed ``gate.toml`` of a gate folder."""

    name: str
    version: str
    kind: str
    description: str = ""
    synthetic: bool = Field(
        description="weights trained on synthetic phantoms: outputs are not for clinical use"
    )
    regions: list[str]
    input: GateInput = GateInput()
    network: GateNetwork = GateNetwork()
    weights: WeightsSpec


KIND = "ct-region-contrast-resnet"


def load_gate_spec(gate_dir: Path) -> GateSpec:
    """Parse and validate ``gate_dir/gate.toml``; :class:`ManifestError` names the file."""
    path = gate_dir / GATE_FILE
    spec = load_toml(path, GateSpec, GATE_FILE)
    if spec.kind != KIND:
        raise ManifestError(f"{path}: kind {spec.kind!r} is not {KIND!r}")
    if tuple(spec.regions) != REGIONS:
        raise ManifestError(f"{path}: regions {spec.regions} are not {list(REGIONS)}")
    return spec


# ---------------------------------------------------------------- network


class _AvgMaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], dim=1)


class CtGateNetwork(nn.Module):
    """MONAI 2D ResNet trunk (pooled embedding) with a region head and a contrast head."""

    def __init__(self, spec: GateSpec) -> None:
        super().__init__()
        net = spec.network
        self.trunk = ResNet(
            block="basic",
            layers=list(net.layers),
            block_inplanes=list(net.block_inplanes),
            spatial_dims=2,
            n_input_channels=len(spec.input.windows),
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
        )
        width = net.block_inplanes[-1]
        if net.pooling == "avg+max":
            self.trunk.avgpool = _AvgMaxPool()  # type: ignore[assignment]
            width *= 2
        self.region = nn.Linear(width, len(REGIONS))
        self.contrast = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embedding (n, F), region logits (n, 3), contrast logit (n,))``."""
        emb = self.trunk(x)
        return emb, self.region(emb), self.contrast(emb)[:, 0]


# ---------------------------------------------------------------- input


def sample_slices(n_slices: int, count: int) -> np.ndarray:
    """Indices of ``count`` planes evenly along k (centres of equal bins); all when fewer."""
    if n_slices < 1:
        raise ValueError(f"n_slices: {n_slices} is not at least 1")
    if n_slices <= count:
        return np.arange(n_slices)
    return np.floor((np.arange(count) + 0.5) * n_slices / count).astype(np.int64)


def resample_planes(
    hu: np.ndarray | torch.Tensor,
    pixel_spacing: tuple[float, float],
    spec: GateInput,
    *,
    zoom: float = 1.0,
    offsets: np.ndarray | None = None,
) -> torch.Tensor:
    """HU planes ``(m, rows, columns)`` to HU canvases ``(m, size, size)`` at the gate's scale.

    ``pixel_spacing`` is (between rows, between columns) in mm. Each plane is resampled to
    ``mm_per_pixel`` (times ``zoom``, a training augmentation) and pasted, centred on its body
    centroid (plus ``offsets[m]`` canvas pixels, training only), on a canvas of air.
    """
    t = torch.as_tensor(hu, dtype=torch.float32)
    if t.ndim != 3 or t.shape[0] < 1:
        raise ValueError(f"hu: shape {tuple(t.shape)} is not (planes, rows, columns)")
    sj, si = (float(v) for v in pixel_spacing)
    if not (math.isfinite(sj) and math.isfinite(si) and sj > 0 and si > 0):
        raise ValueError(f"pixel_spacing: {pixel_spacing} is not two positive lengths")
    t = t.clamp(HU_MIN, HU_MAX)[:, None]
    scale = spec.mm_per_pixel * zoom
    h = max(1, round(t.shape[2] * sj / scale))
    w = max(1, round(t.shape[3] * si / scale))
    if (h, w) != tuple(t.shape[2:]):
        t = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    planes = t[:, 0]
    size = spec.size
    canvas = torch.full((planes.shape[0], size, size), HU_MIN, dtype=torch.float32)
    body = planes > spec.body_threshold_hu
    rows = torch.arange(h, dtype=torch.float32)
    cols = torch.arange(w, dtype=torch.float32)
    for m in range(planes.shape[0]):
        mask = body[m]
        count = float(mask.sum())
        if count > 0:
            cy = float((mask.sum(dim=1) * rows).sum()) / count
            cx = float((mask.sum(dim=0) * cols).sum()) / count
        else:
            cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
        dy, dx = (0.0, 0.0) if offsets is None else (float(offsets[m][0]), float(offsets[m][1]))
        top = int(round((size - 1) / 2.0 + dy - cy))  # canvas row of source row 0
        left = int(round((size - 1) / 2.0 + dx - cx))
        r0, r1 = max(0, top), min(size, top + h)
        c0, c1 = max(0, left), min(size, left + w)
        if r0 < r1 and c0 < c1:
            canvas[m, r0:r1, c0:c1] = planes[m, r0 - top : r1 - top, c0 - left : c1 - left]
    return canvas


def window_channels(canvas: torch.Tensor, spec: GateInput) -> torch.Tensor:
    """HU canvases ``(m, s, s)`` to network input ``(m, windows, s, s)`` in [0, 1]."""
    channels = [
        ((canvas - (centre - width / 2.0)) / width).clamp(0.0, 1.0)
        for centre, width in spec.windows
    ]
    return torch.stack(channels, dim=1)


def gate_planes(volume: Volume, spec: GateInput) -> torch.Tensor:
    """The network input of ``volume``: ``(m, windows, size, size)``, m ≤ ``spec.slices``."""
    array = volume.array
    if array.ndim != 3 or array.shape[0] < 1:
        raise ValueError(f"series {volume.series_uid}: volume shape {array.shape} is not (k, j, i)")
    index = sample_slices(array.shape[0], spec.slices)
    canvas = resample_planes(array[index], (volume.spacing[1], volume.spacing[2]), spec)
    return window_channels(canvas, spec)


# ---------------------------------------------------------------- the gate


@dataclass(frozen=True)
class CtContent:
    """What the gate sees in one CT volume."""

    region: str  # "chest", "abdomen" or "other" (the most probable)
    region_scores: dict[str, float]  # probability of each region, sums to 1
    enhanced: float  # probability that intravenous contrast was given
    features: np.ndarray  # float32 1-D embedding, averaged over the planes read


class CtGate:
    """The loaded gate; :meth:`inspect` reads a volume's pixels, never its header."""

    def __init__(self, spec: GateSpec, network: CtGateNetwork, device: torch.device) -> None:
        self.spec = spec
        self.network = network
        self.device = device
        self.name = spec.name
        self.version = spec.version
        self.synthetic = spec.synthetic

    @classmethod
    def load(cls, gate_dir: Path, device: torch.device) -> CtGate:
        """Read ``gate.toml``, verify the weights' sha256 and load them; problems are a
        :class:`ManifestError` naming the file."""
        spec = load_gate_spec(gate_dir)
        path = verified_gate_weights(gate_dir, spec.name, spec.weights.file, spec.weights.sha256)
        network = load_state(CtGateNetwork(spec), path, f"gate {spec.name}", device)
        return cls(spec, network, device)

    def inspect(self, volume: Volume) -> CtContent:
        """Region and contrast of ``volume`` from its pixels (any number of slices ≥ 1)."""
        x = gate_planes(volume, self.spec.input).to(self.device)
        with torch.inference_mode():
            emb, region_logits, contrast_logit = self.network(x)
            region = torch.softmax(region_logits.float(), dim=1).mean(dim=0).cpu()
            enhanced = float(torch.sigmoid(contrast_logit.float()).mean())
            features = emb.float().mean(dim=0).cpu().numpy().astype(np.float32)
        scores = {name: float(p) for name, p in zip(REGIONS, region.tolist(), strict=True)}
        best = max(REGIONS, key=lambda name: scores[name])
        return CtContent(region=best, region_scores=scores, enhanced=enhanced, features=features)


# ---------------------------------------------------------------- verdicts


_REGION_PHRASE = {"chest": "a chest", "abdomen": "an abdomen", "other": "another body region"}


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: {threshold} is not within [0, 1]")


def region_verdict(
    content: CtContent, accepted: Sequence[str], threshold: float = 0.5
) -> GateVerdict:
    """Pass when the regions in ``accepted`` together score at least ``threshold``.

    ``accepted`` holds names from :data:`REGIONS`. The reason names what the CT looks like
    and what the model reads, e.g. ``"CT looks like an abdomen (abdomen 0.97), not a chest
    examination this model reads"``.
    """
    _check_threshold(threshold)
    wanted = tuple(dict.fromkeys(accepted))
    unknown = [name for name in wanted if name not in REGIONS]
    if not wanted or unknown:
        raise ValueError(f"accepted: {list(accepted)} must be names from {list(REGIONS)}")
    scores = {f"region_{name}": content.region_scores[name] for name in REGIONS}
    score = sum(content.region_scores[name] for name in wanted)
    scores["region_accepted"] = score
    if score >= threshold:
        return GateVerdict(passed=True, reason=None, scores=scores)
    reads = " or ".join(wanted)
    article = "an" if reads[0] in "aeiou" else "a"
    best = content.region
    top = content.region_scores[best]
    if best in wanted:  # the best guess is accepted but too unsure
        listed = ", ".join(f"{name} {content.region_scores[name]:.2f}" for name in REGIONS)
        reason = (
            f"CT body region is uncertain ({listed}); this model reads {article} {reads} "
            f"examination and needs {threshold:.2f}"
        )
    else:
        reason = (
            f"CT looks like {_REGION_PHRASE[best]} ({best} {top:.2f}), not {article} {reads} "
            "examination this model reads"
        )
    return GateVerdict(passed=False, reason=reason, scores=scores)


def contrast_verdict(content: CtContent, *, require: bool, threshold: float = 0.5) -> GateVerdict:
    """With ``require``, pass only when ``enhanced`` is at least ``threshold``.

    Without ``require`` the verdict always passes and carries the score (a model that
    merely prefers contrast ranks series by it).
    """
    _check_threshold(threshold)
    scores = {"enhanced": content.enhanced}
    if not require or content.enhanced >= threshold:
        return GateVerdict(passed=True, reason=None, scores=scores)
    reason = (
        f"CT shows no intravenous contrast (enhanced {content.enhanced:.2f}, needs "
        f"{threshold:.2f}); this model needs a contrast-enhanced series"
    )
    return GateVerdict(passed=False, reason=reason, scores=scores)
