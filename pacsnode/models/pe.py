"""CT pulmonary embolism model (RSNA STR PE layout): 2D slice encoder + bidirectional GRU.

Pipeline (one path for training and serving, see :func:`preprocess_volume`):

1. every source slice is put through the PE window (manifest ``[input]``, WL 100 / WW 700)
   and its central :data:`CROP_MM` square resampled (antialiased) to ``input.size`` pixels —
   chunk by chunk, so no full-resolution copy of the volume is made;
2. the small stack is resampled along z to planes :data:`Z_STEP_MM` apart (any source
   spacing from 0.6 to 3 mm gives the same geometry to the network);
3. MONAI's EfficientNet-B0 reads each plane with its neighbours at ±:data:`Z_STEP_MM`
   as three channels and gives a slice embedding, auxiliary per-slice logits
   (:data:`SLICE_TARGETS`: embolus present, its site and age, heart level...) and a coarse
   map of where it sees an embolus (:func:`where_features`: left or right of the midline);
4. a bidirectional GRU over the embeddings refines the per-plane ``pe_present_on_image``
   logit and, pooled, predicts the nine exam labels;
5. per-plane logits are interpolated back to every **source** slice, and
   :func:`enforce_consistency` makes the outputs satisfy the RSNA label rules.

The shipped weights were trained only on synthetic phantoms (``pacsnode.models.train_pe``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import EfficientNetBN
from monai.networks.nets.efficientnet import MBConvBlock
from torch import nn

from pacsnode.errors import InputError, ManifestError
from pacsnode.manifest import InputSpec, Manifest, load_manifest
from pacsnode.models.base import (
    SeriesResult,
    SliceScore,
    VolumeClassifier,
    load_weights,
    require_hu_window,
)
from pacsnode.volumes import Volume

IMAGE_LABEL = "pe_present_on_image"
EXAM_LABELS: tuple[str, ...] = (
    "negative_exam_for_pe",
    "indeterminate",
    "chronic_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "leftsided_pe",
    "rightsided_pe",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
)
"""The RSNA exam labels in head-output order (the manifest must list them in this order)."""

PE_TYPE_LABELS: tuple[str, ...] = EXAM_LABELS[2:]
LOCATION_LABELS = ("central_pe", "leftsided_pe", "rightsided_pe")
RV_LV_LABELS = ("rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1")
CHRONIC_LABELS = ("chronic_pe", "acute_and_chronic_pe")

SLICE_TARGETS: tuple[str, ...] = (
    "pe_present_on_image",
    "central",
    "left",
    "right",
    "acute",
    "chronic",
    "indeterminate",
    "ventricles",
    "rv_gte_lv",
)
"""Per-slice outputs of the encoder; only the first is served, the rest train the embedding."""

WHERE_FEATURES = ("where_any", "where_right", "where_left")
N_SLICE_FEATURES = len(SLICE_TARGETS) + len(WHERE_FEATURES)
WHERE_STAGE = 4
"""EfficientNet-B0 stage (112 channels, stride 16) the where map reads."""
WHERE_CHANNELS = 112
WHERE_SIDE_MM = 35.0
Z_STEP_MM = 2.5
CROP_MM = 280.0
"""In-plane field the network sees, around the reconstruction centre, at CROP_MM/size mm/px."""
EMBED_DIM = 128
GRU_INPUT = 96
GRU_HIDDEN = 64
CONSISTENCY_MARGIN = 1e-3
"""Nudged values land at 0.5 ± this margin (the RSNA rules compare with 0.5)."""

RSNA_EXAM_WEIGHTS: dict[str, float] = {
    "negative_exam_for_pe": 0.0736196319,
    "indeterminate": 0.09202453988,
    "chronic_pe": 0.1042944785,
    "acute_and_chronic_pe": 0.1042944785,
    "central_pe": 0.1877300613,
    "leftsided_pe": 0.06257668712,
    "rightsided_pe": 0.06257668712,
    "rv_lv_ratio_gte_1": 0.2346625767,
    "rv_lv_ratio_lt_1": 0.0782208589,
}
RSNA_IMAGE_WEIGHT = 0.07361963


# ---------------------------------------------------------------- network


class SliceEncoder(nn.Module):
    """EfficientNet-B0 over (k-1, k, k+1): an embedding, per-slice logits and a "where" map.

    Three changes to MONAI's defaults, all parameter-free, for a short training from
    scratch on CPU: batch-norm momentum 0.1 (the TF-style 0.01 leaves eval-mode statistics
    far from the trained ones), no stochastic depth, and global *max* pooling — an embolus
    covers a few pixels and average pooling dilutes it. The "where" map is a 1×1 convolution
    on the stride-16 features (8×8 cells of 35 mm at 128 pixels) trained to mark the cells
    holding an embolus; its maxima over the patient-left and patient-right parts of the field
    (:func:`where_features`) tell the exam head on which side the encoder saw something.
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = EfficientNetBN(
            "efficientnet-b0",
            pretrained=False,
            spatial_dims=2,
            in_channels=3,
            num_classes=EMBED_DIM,
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
        )
        for module in self.backbone.modules():
            if isinstance(module, MBConvBlock):
                module.drop_connect_rate = 0.0
        self.backbone._avg_pooling = nn.AdaptiveMaxPool2d(1)  # type: ignore[assignment]
        self.head = nn.Linear(EMBED_DIM, len(SLICE_TARGETS))
        self.where = nn.Conv2d(WHERE_CHANNELS, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embedding, per-slice logits, where-map logits (n, 1, h, w))``; MONAI's own
        forward, with the stride-16 features tapped on the way."""
        b = self.backbone
        stages = list(b._blocks)
        h = b._swish(b._bn0(b._conv_stem(b._conv_stem_padding(x))))
        for stage in stages[: WHERE_STAGE + 1]:
            h = stage(h)
        where = self.where(h)
        for stage in stages[WHERE_STAGE + 1 :]:
            h = stage(h)
        h = b._swish(b._bn1(b._conv_head(b._conv_head_padding(h))))
        emb = b._fc(b._dropout(b._avg_pooling(h).flatten(start_dim=1)))
        return emb, self.head(F.silu(emb)), where


def where_features(where: torch.Tensor) -> torch.Tensor:
    """``(n, 3)``: the where map's maximum overall, over cells centred more than
    :data:`WHERE_SIDE_MM` to the patient's right (-x), and to the patient's left (+x).

    Map columns run toward +x (canonical orientation) across the central :data:`CROP_MM`.
    """
    w = where.shape[-1]
    centres = (torch.arange(w, dtype=torch.float32) + 0.5) * CROP_MM / w - CROP_MM / 2.0
    right = centres < -WHERE_SIDE_MM
    left = centres > WHERE_SIDE_MM
    flat = where[:, 0]
    return torch.stack(
        [
            flat.amax(dim=(1, 2)),
            flat[:, :, right].amax(dim=(1, 2)),
            flat[:, :, left].amax(dim=(1, 2)),
        ],
        dim=1,
    )


def slice_features(logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """What the exam head reads per plane besides the embedding: logits + where features."""
    return torch.cat([logits, where_features(where)], dim=1)


class ExamHead(nn.Module):
    """Bidirectional GRU over slice features: refined slice logits and exam logits.

    Input per plane: the embedding and :func:`slice_features` (the encoder's per-slice
    logits and where-map maxima). The refined slice logit is the encoder's
    ``pe_present_on_image`` logit plus a GRU correction; the exam logits come from the masked
    mean and max of the GRU states and of the slice features.
    """

    def __init__(self) -> None:
        super().__init__()
        n_in = EMBED_DIM + N_SLICE_FEATURES
        self.norm = nn.LayerNorm(n_in)
        self.proj = nn.Linear(n_in, GRU_INPUT)
        self.drop = nn.Dropout(0.2)
        self.gru = nn.GRU(GRU_INPUT, GRU_HIDDEN, batch_first=True, bidirectional=True)
        self.slice_out = nn.Linear(2 * GRU_HIDDEN, 1)
        self.exam_out = nn.Linear(4 * GRU_HIDDEN + 2 * N_SLICE_FEATURES, len(EXAM_LABELS))

    def forward(
        self, emb: torch.Tensor, slice_logits: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``emb`` (B, M, E), ``slice_logits`` (B, M, F) slice features, ``lengths`` (B,)."""
        b, m, _ = emb.shape
        feats = torch.cat([emb, slice_logits], dim=-1)
        x = self.drop(F.silu(self.proj(self.norm(feats))))
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.gru(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=m)
        valid = torch.arange(m, device=emb.device)[None, :] < lengths.to(emb.device)[:, None]
        refined = slice_logits[..., 0] + self.slice_out(self.drop(h)).squeeze(-1)
        w = valid.unsqueeze(-1).to(h.dtype)
        n = w.sum(dim=1).clamp_min(1.0)
        neg = torch.finfo(h.dtype).min
        pooled = torch.cat(
            [
                (h * w).sum(dim=1) / n,
                h.masked_fill(~valid.unsqueeze(-1), neg).amax(dim=1),
                (slice_logits * w).sum(dim=1) / n,
                slice_logits.masked_fill(~valid.unsqueeze(-1), neg).amax(dim=1),
            ],
            dim=-1,
        )
        return refined, self.exam_out(self.drop(pooled))


class PENetwork(nn.Module):
    """The architecture the weights belong to: ``encoder.*`` and ``exam_head.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = SliceEncoder()
        self.exam_head = ExamHead()


def build_network() -> PENetwork:
    return PENetwork()


# ---------------------------------------------------------------- preprocessing


def window_resize(
    hu: np.ndarray, pixel_spacing: tuple[float, float], spec: InputSpec, chunk: int = 32
) -> torch.Tensor:
    """HU slices ``(k, j, i)`` to ``(k, size, size)`` float32 in [0, 1], chunk by chunk.

    PE window from ``spec``; the central :data:`CROP_MM` square of each slice (around the
    reconstruction centre: mediastinum, hila and most of the lungs) is resampled to a fixed
    ``CROP_MM / size`` mm per pixel with antialiasing, so anatomy has the same size in pixels
    whatever the field of view; a smaller field of view is padded with air (0 after the
    window). Only one chunk of full-resolution temporaries exists at a time, so a 400-slice
    512² volume costs ~70 MB on top of itself.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu: expected (k, j, i), got shape {hu.shape}")
    if spec.window_center is None or spec.window_width is None:
        raise ValueError("input spec has no HU window (window_center/window_width)")
    k = hu.shape[0]
    size = spec.size
    target_mm = CROP_MM / size
    spans, dims = [], []
    for n, sp in zip(hu.shape[1:], pixel_spacing, strict=True):
        keep = min(n, max(1, math.ceil(CROP_MM / float(sp))))
        start = (n - keep) // 2
        spans.append(slice(start, start + keep))
        dims.append(max(1, min(size, round(keep * float(sp) / target_mm))))
    hj, hi = dims
    oj, oi = (size - hj) // 2, (size - hi) // 2
    lo = spec.window_center - spec.window_width / 2.0
    width = spec.window_width
    out = torch.zeros((k, size, size), dtype=torch.float32)
    for start in range(0, k, chunk):
        block = hu[start : start + chunk, spans[0], spans[1]]
        t = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        t = t.sub(lo).div_(width).clamp_(0.0, 1.0).unsqueeze(1)
        if tuple(t.shape[-2:]) != (hj, hi):
            t = F.interpolate(
                t, size=(hj, hi), mode="bilinear", antialias=True, align_corners=False
            )
        out[start : start + chunk, oj : oj + hj, oi : oi + hi] = t[:, 0].clamp_(0.0, 1.0)
    return out


def resample_positions(n_slices: int, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Source and resampled plane positions (mm along k): planes :data:`Z_STEP_MM` apart,
    centred in the source range."""
    if spacing_mm <= 0:
        raise ValueError(f"slice spacing {spacing_mm} mm is not positive")
    src = np.arange(n_slices, dtype=np.float64) * spacing_mm
    length = src[-1] if n_slices else 0.0
    m = int(math.floor(length / Z_STEP_MM + 1e-6)) + 1
    offset = (length - (m - 1) * Z_STEP_MM) / 2.0
    return src, offset + np.arange(m, dtype=np.float64) * Z_STEP_MM


def resample_z(stack: torch.Tensor, spacing_mm: float) -> torch.Tensor:
    """Linear interpolation of ``(k, s, s)`` planes onto :func:`resample_positions`."""
    k = stack.shape[0]
    src, dst = resample_positions(k, spacing_mm)
    if k == 1:
        return stack.clone()
    pos = dst / spacing_mm
    lo = np.clip(np.floor(pos).astype(np.int64), 0, k - 2)
    w = torch.from_numpy((pos - lo).astype(np.float32))[:, None, None]
    lo_t = torch.from_numpy(lo)
    return stack[lo_t] * (1.0 - w) + stack[lo_t + 1] * w


def preprocess_volume(
    hu: np.ndarray, spacing: tuple[float, float, float], spec: InputSpec
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Canonical HU volume to network planes ``(m, size, size)`` in [0, 1], with the source
    and plane positions (mm along k) used to map outputs back to source slices."""
    stack = window_resize(hu, (spacing[1], spacing[2]), spec)
    planes = resample_z(stack, spacing[0])
    src, dst = resample_positions(hu.shape[0], spacing[0])
    return planes, src, dst


def network_input(planes: torch.Tensor, index: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Three-channel, normalised input for planes ``index``: neighbours at ±1 plane."""
    m = planes.shape[0]
    idx = torch.stack([(index - 1).clamp(0, m - 1), index, (index + 1).clamp(0, m - 1)], dim=1)
    x = planes[idx].float()  # (n, 3, s, s)
    mean = torch.tensor(spec.mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32)[None, :, None, None]
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- label consistency


def _check_exam(exam: dict[str, float]) -> dict[str, float]:
    missing = [name for name in EXAM_LABELS if name not in exam]
    if missing:
        raise ValueError(f"exam probabilities lack {missing}")
    values = {name: float(exam[name]) for name in EXAM_LABELS}
    bad = [name for name, v in values.items() if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"exam probabilities outside [0, 1] or NaN: {bad}")
    return values


def consistency_violations(image_probs: np.ndarray, exam: dict[str, float]) -> list[str]:
    """The RSNA STR PE label-consistency rules this output breaks (empty when valid).

    Positive exam (some image > 0.5): negative and indeterminate < 0.5, exactly one RV:LV
    label > 0.5, at least one location > 0.5, at most one of chronic / acute-and-chronic >
    0.5. Negative exam: exactly one of negative / indeterminate > 0.5 and every PE-type
    label < 0.5.
    """
    e = _check_exam(exam)
    p = np.asarray(image_probs, dtype=np.float64)
    problems: list[str] = []
    if p.size and not np.all((p >= 0.0) & (p <= 1.0)):
        problems.append("image probabilities outside [0, 1] or NaN")
        return problems
    top = float(p.max()) if p.size else 0.0
    if top > 0.5:
        tag = f"positive exam (max image {top:.3f})"
        for name in ("negative_exam_for_pe", "indeterminate"):
            if e[name] >= 0.5:
                problems.append(f"{tag}: {name} {e[name]:.4f} is not below 0.5")
        above = [n for n in RV_LV_LABELS if e[n] > 0.5]
        if len(above) != 1:
            problems.append(f"{tag}: {len(above)} RV:LV labels above 0.5, need exactly one")
        if not any(e[n] > 0.5 for n in LOCATION_LABELS):
            problems.append(f"{tag}: no location (central/left/right) above 0.5")
        if all(e[n] > 0.5 for n in CHRONIC_LABELS):
            problems.append(f"{tag}: chronic_pe and acute_and_chronic_pe both above 0.5")
    else:
        tag = f"negative exam (max image {top:.3f})"
        above = [n for n in ("negative_exam_for_pe", "indeterminate") if e[n] > 0.5]
        if len(above) != 1:
            problems.append(
                f"{tag}: {len(above)} of negative_exam_for_pe/indeterminate above 0.5, need one"
            )
        for name in PE_TYPE_LABELS:
            if e[name] >= 0.5:
                problems.append(f"{tag}: {name} {e[name]:.4f} is not below 0.5")
    return problems


def _logit(p: float) -> float:
    q = min(max(p, 1e-7), 1.0 - 1e-7)
    return math.log(q / (1.0 - q))


def _as_positive(p: np.ndarray, e: dict[str, float]) -> tuple[np.ndarray, dict[str, float]]:
    hi, lo = 0.5 + CONSISTENCY_MARGIN, 0.5 - CONSISTENCY_MARGIN
    p = p.copy()
    e = dict(e)
    if p.size and p.max() <= 0.5:
        i = int(np.argmax(p))
        p[i] = hi
    for name in ("negative_exam_for_pe", "indeterminate"):
        if e[name] >= 0.5:
            e[name] = lo
    a, b = RV_LV_LABELS
    if e[a] > 0.5 and e[b] > 0.5:
        e[a if e[a] < e[b] else b] = lo
    elif e[a] <= 0.5 and e[b] <= 0.5:
        e[a if e[a] >= e[b] else b] = hi
    if not any(e[n] > 0.5 for n in LOCATION_LABELS):
        e[max(LOCATION_LABELS, key=lambda n: e[n])] = hi
    c, ac = CHRONIC_LABELS
    if e[c] > 0.5 and e[ac] > 0.5:
        e[c if e[c] < e[ac] else ac] = lo
    return p, e


def _as_negative(p: np.ndarray, e: dict[str, float]) -> tuple[np.ndarray, dict[str, float]]:
    hi, lo = 0.5 + CONSISTENCY_MARGIN, 0.5 - CONSISTENCY_MARGIN
    p = np.where(p > 0.5, lo, p)
    e = dict(e)
    a, b = "negative_exam_for_pe", "indeterminate"
    if e[a] > 0.5 and e[b] > 0.5:
        e[a if e[a] < e[b] else b] = lo
    elif e[a] <= 0.5 and e[b] <= 0.5:
        e[a if e[a] >= e[b] else b] = hi
    for name in PE_TYPE_LABELS:
        if e[name] >= 0.5:
            e[name] = lo
    return p, e


def _nudge_cost(
    p0: np.ndarray, e0: dict[str, float], p1: np.ndarray, e1: dict[str, float]
) -> float:
    """Total log-odds change: the image change counts once (its largest), each exam label once."""
    cost = sum(abs(_logit(e1[n]) - _logit(e0[n])) for n in EXAM_LABELS)
    if p0.size:
        cost += abs(_logit(float(p1.max())) - _logit(float(p0.max())))
    return cost


def enforce_consistency(
    image_probs: np.ndarray, exam: dict[str, float]
) -> tuple[np.ndarray, dict[str, float]]:
    """Make an output satisfy the RSNA rules with the smallest nudges.

    Both consistent readings are built — positive (lift the top image if needed, fix the
    exam labels) and negative (cap every image, fix the exam labels) — each by moving only
    the offending values to 0.5 ± :data:`CONSISTENCY_MARGIN`; the one with the smaller total
    log-odds change wins (ties keep the image verdict). Valid input comes back unchanged.
    """
    e = _check_exam(exam)
    p = np.asarray(image_probs, dtype=np.float64).copy()
    if p.size and not np.all((p >= 0.0) & (p <= 1.0)):
        raise ValueError("image probabilities outside [0, 1] or NaN")
    pos = _as_positive(p, e)
    neg = _as_negative(p, e)
    cost_pos = _nudge_cost(p, e, *pos)
    cost_neg = _nudge_cost(p, e, *neg)
    image_positive = bool(p.size and p.max() > 0.5)
    if cost_pos < cost_neg or (cost_pos == cost_neg and image_positive):
        return pos
    return neg


# ---------------------------------------------------------------- the served model


class PEClassifier(VolumeClassifier):
    """Slice encoder + GRU exam head over one canonical CT volume, in inference mode."""

    def __init__(self, manifest: Manifest, network: PENetwork, device: torch.device):
        self.manifest = manifest
        self.network = network
        self.device = device

    @classmethod
    def load(cls, model_dir: Path, device: torch.device) -> PEClassifier:
        manifest = load_manifest(model_dir)
        image = [label.name for label in manifest.image_labels]
        exam = [label.name for label in manifest.exam_labels]
        if image != [IMAGE_LABEL] or exam != list(EXAM_LABELS):
            raise ManifestError(
                f"model {manifest.name}: labels {image + exam} differ from the network's "
                f"{[IMAGE_LABEL, *EXAM_LABELS]}"
            )
        require_hu_window(manifest, channels=3)
        network = load_weights(build_network(), model_dir, manifest, device)
        network.encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return cls(manifest, network, device)

    def predict_array(
        self, hu: np.ndarray, spacing: tuple[float, float, float]
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Consistent per-source-slice probabilities and exam probabilities of a volume."""
        planes, src, dst = preprocess_volume(hu, spacing, self.manifest.input)
        slice_logits, exam_logits = self.forward_planes(planes)
        per_source = np.interp(src, dst, slice_logits)
        image = 1.0 / (1.0 + np.exp(-per_source))
        exam_p = 1.0 / (1.0 + np.exp(-exam_logits))
        exam = {name: float(v) for name, v in zip(EXAM_LABELS, exam_p, strict=True)}
        return enforce_consistency(image, exam)

    def forward_planes(self, planes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Refined per-plane logits and exam logits; encoder in chunks of ``batch_size``."""
        spec = self.manifest.input
        m = planes.shape[0]
        embs, logits = [], []
        with torch.inference_mode():
            for start in range(0, m, self.manifest.batch_size):
                index = torch.arange(start, min(m, start + self.manifest.batch_size))
                x = network_input(planes, index, spec).to(self.device)
                emb, out, where = self.network.encoder(x)
                embs.append(emb.float())
                logits.append(slice_features(out, where).float())
            emb_all = torch.cat(embs)[None]
            logit_all = torch.cat(logits)[None]
            refined, exam = self.network.exam_head(emb_all, logit_all, torch.tensor([m]))
        return refined[0].cpu().double().numpy(), exam[0].cpu().double().numpy()

    def classify(self, volume: Volume) -> SeriesResult:
        hu = volume.array
        if hu.ndim != 3 or hu.shape[0] != len(volume.slices):
            raise InputError(
                f"series {volume.series_uid}: volume shape {hu.shape} does not match its "
                f"{len(volume.slices)} source slices"
            )
        if hu.shape[0] < 2 or min(volume.spacing) <= 0:
            raise InputError(
                f"series {volume.series_uid}: {hu.shape[0]} slices with spacing "
                f"{volume.spacing} mm; the PE model needs at least 2 slices and positive spacing"
            )
        image, exam = self.predict_array(hu, volume.spacing)
        scores = tuple(
            SliceScore(
                sop_instance_uid=ref.sop_instance_uid,
                sop_class_uid=ref.sop_class_uid,
                frame=ref.frame,
                probability=float(p),
            )
            for ref, p in zip(volume.slices, image, strict=True)
        )
        return SeriesResult(
            series_uid=volume.series_uid, image_label=IMAGE_LABEL, slices=scores, exam=exam
        )
