"""Out-of-distribution gate: how far an input's features lie from the model's training data.

The score is the Mahalanobis distance of a feature vector (the chest X-ray model's pooled
penultimate DenseNet features; for CT models the content gate's embedding of the volume)
from the mean of the features of the data the model was made for, under a Ledoit-Wolf
shrunk covariance (well conditioned with fewer cases than dimensions). The threshold is a
quantile (by default 0.99) of the distances of *held-out* in-distribution cases, so about
1 % of inputs like the training data are flagged, and anything unlike it — a real
radiograph for a model trained on phantoms, a foot, a scanned document — scores far above.

The statistics live in the model folder as ``ood.safetensors`` (mean and precision matrix,
the threshold and where the data came from in its metadata), pinned by sha256 in the
manifest's ``[ood]``. :func:`calibrate` makes them; ``pacsnode models calibrate`` runs it on
a site's own DICOM, so a hospital that brings real weights gets a real gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from pacsnode.errors import ManifestError
from pacsnode.gates import GateVerdict
from pacsnode.manifest import Manifest, sha256_file, verified_file

OOD_FILE = "ood.safetensors"
DEFAULT_QUANTILE = 0.99


@dataclass(frozen=True)
class OodStats:
    """Mean and precision of the in-distribution features, and the flagging threshold."""

    mean: np.ndarray  # (d,)
    precision: np.ndarray  # (d, d)
    threshold: float
    quantile: float
    n_fit: int
    n_calibration: int
    source: str  # where the in-distribution data came from, in words
    features: str  # which features, in words

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` (n, d)."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"features: {x.shape[1]} values per input, the statistics have {self.mean.shape[0]}"
            )
        x = x - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", x, self.precision, x), 0.0))

    def verdict(self, distance: float, what: str = "input") -> GateVerdict:
        """Pass when ``distance`` is at most the threshold; the reason says how far out."""
        scores = {"ood_distance": float(distance), "ood_threshold": self.threshold}
        if distance <= self.threshold:
            return GateVerdict(True, None, scores)
        return GateVerdict(
            False,
            f"{what} lies outside the data this model was trained on (out-of-distribution "
            f"distance {distance:.1f}, limit {self.threshold:.1f})",
            scores,
        )


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Ledoit-Wolf shrunk covariance of the rows of ``x`` (Ledoit & Wolf 2004)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"features: {n} cases; at least 2 are needed to fit a distribution")
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / n
    mu = np.trace(cov) / d
    x2 = xc**2
    beta_ = float(np.sum(x2.T @ x2)) / n
    delta_ = float(np.sum(cov**2))
    beta = (beta_ - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * np.trace(cov) + d * mu**2) / d
    shrinkage = 0.0 if delta <= 0 else min(max(beta, 0.0), delta) / delta
    shrunk = (1.0 - shrinkage) * cov + shrinkage * mu * np.eye(d)
    return mean, shrunk


def calibrate(
    fit: np.ndarray,
    held_out: np.ndarray,
    *,
    quantile: float = DEFAULT_QUANTILE,
    source: str,
    features: str,
) -> OodStats:
    """Fit on ``fit`` (n, d); the threshold is the ``quantile`` of ``held_out``'s distances."""
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile: {quantile} is not in [0.5, 1)")
    if len(held_out) < 2:
        raise ValueError(f"held_out: {len(held_out)} cases; at least 2 are needed")
    mean, cov = ledoit_wolf(fit)
    precision = np.linalg.pinv(cov, hermitian=True)
    partial = OodStats(mean, precision, np.inf, quantile, len(fit), len(held_out), source, features)
    threshold = float(np.quantile(partial.distances(held_out), quantile))
    return OodStats(mean, precision, threshold, quantile, len(fit), len(held_out), source, features)


def save(stats: OodStats, path: Path) -> str:
    """Write ``stats`` to ``path``; returns its sha256 for the manifest."""
    save_file(
        {
            "mean": stats.mean.astype(np.float32),
            "precision": stats.precision.astype(np.float32),
        },
        str(path),
        metadata={
            "threshold": repr(stats.threshold),
            "quantile": repr(stats.quantile),
            "n_fit": str(stats.n_fit),
            "n_calibration": str(stats.n_calibration),
            "source": stats.source,
            "features": stats.features,
        },
    )
    return sha256_file(path)


def load(model_dir: Path, manifest: Manifest) -> OodStats | None:
    """The model's statistics, verified against the manifest's sha256; None without ``[ood]``."""
    spec = manifest.ood
    if spec is None:
        return None
    path = verified_file(
        model_dir / spec.file,
        spec.sha256,
        f"model {manifest.name}",
        "manifest",
        "run `pacsnode models calibrate` again or fix the manifest",
    )
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata() or {}
    tensors = load_file(str(path))
    try:
        return OodStats(
            mean=tensors["mean"].astype(np.float64),
            precision=tensors["precision"].astype(np.float64),
            threshold=float(meta["threshold"]),
            quantile=float(meta["quantile"]),
            n_fit=int(meta["n_fit"]),
            n_calibration=int(meta["n_calibration"]),
            source=meta.get("source", ""),
            features=meta.get("features", ""),
        )
    except (KeyError, ValueError) as exc:
        raise ManifestError(f"model {manifest.name}: {path} lacks {exc}") from exc
