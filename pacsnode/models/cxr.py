"""CheXNet-style chest X-ray classifier: MONAI DenseNet-121, 14 sigmoid outputs.

:func:`preprocess` is the one path from a dataset to the network input; the
training script calls it too, so training and serving cannot drift apart.
:func:`import_chexnet` converts a checkpoint in the public CheXNet layout into
this model folder's safetensors weights.

Heatmaps are Grad-CAM (Selvaraju et al. 2017) from the same forward pass as the
probabilities, taken at three depths and fused: the gradients of a label's logit with respect
to the outputs of dense blocks 2, 3 and 4 (28x28, 14x14 and 7x7 at 224 px), averaged over
space, weight those feature maps; each weighted sum is rectified and divided by its maximum,
the coarser ones are upsampled to 28x28, and the map is their geometric mean, divided by its
maximum. The last block alone, Grad-CAM's usual layer, has cells of 60 mm on a 420 mm chest
and put the peak inside a 10-24 mm nodule on 6 % of the phantoms; the fused map keeps the
deep blocks' choice of *which* structure and the shallower block's finer *where* (measured
on the phantoms, see tests/test_heatmaps.py). Only the network after dense block 2 is
differentiated, one backward pass per label for the whole batch: about 10 ms per image plus
23 ms per further label on 2 CPU cores.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121
from pydicom.dataset import Dataset
from safetensors.torch import save_file

from pacsnode.errors import ManifestError
from pacsnode.manifest import (
    MANIFEST_FILE,
    InputSpec,
    Manifest,
    load_manifest,
    sha256_file,
)
from pacsnode.models.base import ImageClassifier, ImageResult, heatmap_on_source, load_weights
from pacsnode.pixels import to_display_array

NUM_LABELS = 14


def build_network(out_channels: int = NUM_LABELS) -> torch.nn.Module:
    """The architecture the weights belong to (logits out; sigmoid applied by the caller)."""
    return DenseNet121(spatial_dims=2, in_channels=3, out_channels=out_channels)


def image_to_tensor(image: np.ndarray, input_spec: InputSpec) -> torch.Tensor:
    """Display image (2D, [0, 1]) to a normalised ``channels×size×size`` tensor.

    Whole-image resize (antialiased bilinear, area-like when shrinking), channel
    replication, mean/std normalisation.
    """
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    size = input_spec.size
    if t.shape[-2:] != (size, size):
        t = F.interpolate(
            t, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    t = t[0].clamp_(0.0, 1.0).expand(input_spec.channels, size, size)
    mean = torch.tensor(input_spec.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(input_spec.std, dtype=torch.float32)[:, None, None]
    return (t - mean) / std


def preprocess(ds: Dataset, input_spec: InputSpec) -> torch.Tensor:
    """Dataset to network input; raises :class:`InputError` naming the instance."""
    return image_to_tensor(to_display_array(ds), input_spec)


class ChexNetClassifier(ImageClassifier):
    """DenseNet-121 over single chest radiographs, batched, in inference mode."""

    def __init__(self, manifest: Manifest, network: torch.nn.Module, device: torch.device):
        self.manifest = manifest
        self.network = network
        self.device = device

    @classmethod
    def load(cls, model_dir: Path, device: torch.device) -> ChexNetClassifier:
        manifest = load_manifest(model_dir)
        if len(manifest.labels) != NUM_LABELS:
            raise ManifestError(
                f"model {manifest.name}: {len(manifest.labels)} labels, DenseNet-121 head has "
                f"{NUM_LABELS}"
            )
        network = load_weights(build_network(), model_dir, manifest, device)
        return cls(manifest, network, device)

    def predict(self, datasets: Sequence[Dataset], *, heatmaps: bool = False) -> list[ImageResult]:
        if not datasets:
            return []
        inputs = torch.stack([preprocess(ds, self.manifest.input) for ds in datasets])
        pooled: list[torch.Tensor] = []
        if heatmaps:
            probs, maps = self.predict_tensors_with_heatmaps(inputs, features_out=pooled)
        else:
            probs = self.predict_tensors(inputs, features_out=pooled)
            maps = [{} for _ in datasets]
        names = self.manifest.label_names
        features = torch.cat(pooled).numpy()
        return [
            ImageResult(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                probabilities={name: float(p) for name, p in zip(names, row, strict=True)},
                heatmaps=image_maps,
                features=feature,
            )
            for ds, row, image_maps, feature in zip(
                datasets, probs.tolist(), maps, features, strict=True
            )
        ]

    def predict_tensors(
        self, inputs: torch.Tensor, *, features_out: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Sigmoid probabilities for preprocessed inputs, in chunks of ``batch_size``;
        ``features_out`` gets the pooled penultimate features (1024 per image) of each chunk,
        what the out-of-distribution gate measures (:mod:`pacsnode.gates.ood`)."""
        outputs = []
        with torch.inference_mode():
            for start in range(0, inputs.shape[0], self.manifest.batch_size):
                chunk = inputs[start : start + self.manifest.batch_size].to(self.device)
                logits = self._head(self._part("features")(chunk), features_out)
                outputs.append(torch.sigmoid(logits).float().cpu())
        return torch.cat(outputs)

    def _head(self, hidden: torch.Tensor, features_out: list[torch.Tensor] | None) -> torch.Tensor:
        """``class_layers`` step by step (ReLU, pool, flatten, linear: the same operations
        as its forward), keeping the pooled features when asked."""
        layers = dict(self._part("class_layers").named_children())
        pooled = layers["flatten"](layers["pool"](layers["relu"](hidden)))
        if features_out is not None:
            features_out.append(pooled.detach().float().cpu())
        return cast(torch.Tensor, layers["out"](pooled))

    def predict_tensors_with_heatmaps(
        self,
        inputs: torch.Tensor,
        labels: Sequence[str] | None = None,
        *,
        features_out: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[dict[str, np.ndarray]]]:
        """:meth:`predict_tensors` plus, per image, the fused Grad-CAM map (28x28, see the module
        docstring) of every reported label at or above its threshold, or of each of
        ``labels`` whatever its probability (to inspect the model). The probabilities are
        the network's own forward, layer by layer, with autograd recording its second half."""
        unknown = sorted(set(labels or ()) - set(self.manifest.label_names))
        if unknown:
            raise ValueError(f"labels: {unknown} are not labels of model {self.manifest.name}")
        features = dict(self._part("features").named_children())
        split = list(features).index(CAM_LAYERS[0]) + 1
        outputs: list[torch.Tensor] = []
        maps: list[dict[str, np.ndarray]] = []
        for start in range(0, inputs.shape[0], self.manifest.batch_size):
            chunk = inputs[start : start + self.manifest.batch_size].to(self.device)
            with torch.inference_mode():
                early = chunk
                for layer in list(features.values())[:split]:
                    early = layer(early)
            with torch.enable_grad():
                hidden = early.clone().requires_grad_(True)  # leaves inference mode
                taps = {CAM_LAYERS[0]: hidden}
                for name, layer in list(features.items())[split:]:
                    hidden = layer(hidden)
                    if name in CAM_LAYERS:
                        taps[name] = hidden
                logits = self._head(hidden.clone(), features_out)  # its ReLU is in place
            probs = torch.sigmoid(logits.detach()).float().cpu()
            outputs.append(probs)
            with torch.enable_grad():  # whatever grad mode the caller runs in
                maps.extend(self._grad_cam(logits, taps, probs, labels))
        return torch.cat(outputs), maps

    def _part(self, name: str) -> torch.nn.Module:
        """``features`` or ``class_layers`` of the DenseNet (``forward`` is one, then the other)."""
        return cast(torch.nn.Module, getattr(self.network, name))

    def _grad_cam(
        self,
        logits: torch.Tensor,
        taps: dict[str, torch.Tensor],
        probs: torch.Tensor,
        labels: Sequence[str] | None,
    ) -> list[dict[str, np.ndarray]]:
        """Fused Grad-CAM of ``labels``, or of the reported labels each image is positive for,
        from ``logits`` and the recorded block outputs ``taps`` they were computed from."""
        index = {name: i for i, name in enumerate(self.manifest.label_names)}
        wanted = [
            list(labels)
            if labels is not None
            else [
                label.name
                for label in self.manifest.reported_labels
                if float(row[index[label.name]]) >= label.threshold
            ]
            for row in probs
        ]
        maps: list[dict[str, np.ndarray]] = [{} for _ in wanted]
        needed = sorted({name for names in wanted for name in names}, key=index.__getitem__)
        tensors = [taps[name] for name in CAM_LAYERS]
        for name in needed:
            grads = torch.autograd.grad(
                logits[:, index[name]].sum(), tensors, retain_graph=name != needed[-1]
            )
            per_layer = [
                _normalised(torch.relu((g.mean(dim=(2, 3), keepdim=True) * t.detach()).sum(1)))
                for g, t in zip(grads, tensors, strict=True)
            ]
            size = per_layer[0].shape[1]
            for i, names in enumerate(wanted):
                if name in names:
                    fused = np.ones((size, size), np.float32)
                    for layer in per_layer:
                        fused *= heatmap_on_source(layer[i], size, size)
                    maps[i][name] = _normalised_map(np.power(fused, 1.0 / len(per_layer)))
        return maps


CAM_LAYERS = ("denseblock2", "denseblock3", "norm5")
"""The layers whose Grad-CAM maps are fused, finest first (its output is the autograd leaf);
``norm5`` is the last block's output after its normalisation, Grad-CAM's usual layer."""


def _normalised(cams: torch.Tensor) -> np.ndarray:
    """Each map of a batch divided by its own maximum (an all-zero map stays zero)."""
    values = cams.float().cpu().numpy()
    peaks = values.reshape(len(values), -1).max(axis=1)
    return (values / np.where(peaks > 0, peaks, 1.0)[:, None, None]).astype(np.float32)


def _normalised_map(cam: np.ndarray) -> np.ndarray:
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).astype(np.float32)


# ---------------------------------------------------------------- CheXNet import

_PREFIX = "module.densenet121."
_OLD_LAYER = re.compile(r"\.(norm|relu|conv)\.([12])\.")


def chexnet_key_to_monai(key: str) -> str:
    """Map one public-CheXNet key to its MONAI DenseNet121 name.

    ``module.densenet121.features.denseblockB.denselayerN.norm.1.weight`` becomes
    ``features.denseblockB.denselayerN.layers.norm1.weight`` (MONAI wraps each dense
    layer's modules in ``layers``); ``classifier.0`` becomes ``class_layers.out``.
    Stem and transition names are the same in both.
    """
    if not key.startswith(_PREFIX):
        raise ManifestError(f"checkpoint key {key!r} lacks the {_PREFIX!r} prefix")
    name = key[len(_PREFIX) :]
    if name.startswith("classifier.0."):
        return "class_layers.out." + name[len("classifier.0.") :]
    if name.startswith("classifier."):
        # a plain Linear head (torchvision layout without the Sigmoid wrapper)
        return "class_layers.out." + name[len("classifier.") :]
    if ".denselayer" in name:
        name = _OLD_LAYER.sub(r".\1\2.", name)
        name = re.sub(r"(denselayer\d+)\.(norm|relu|conv)(\d)", r"\1.layers.\2\3", name)
    return name


def import_chexnet(checkpoint: Path, model_dir: Path) -> Path:
    """Convert a public CheXNet checkpoint into ``model_dir/weights.safetensors``.

    Rewrites only ``[weights] sha256`` in the manifest. Old checkpoints (PyTorch
    0.3) lack ``num_batches_tracked``; those counters are filled with zeros since
    inference does not use them. Any other missing or unexpected key, or a shape
    mismatch, raises :class:`ManifestError`.
    """
    manifest = load_manifest(model_dir)
    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ManifestError(f"{checkpoint}: cannot read checkpoint: {exc}") from exc
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ManifestError(f"{checkpoint}: no state_dict in checkpoint")

    target = build_network().state_dict()
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = chexnet_key_to_monai(key)
        if name not in target:
            raise ManifestError(f"{checkpoint}: unexpected key {key!r} (maps to {name!r})")
        if tuple(value.shape) != tuple(target[name].shape):
            raise ManifestError(
                f"{checkpoint}: {key!r} has shape {tuple(value.shape)}, "
                f"{name!r} needs {tuple(target[name].shape)}"
            )
        converted[name] = value.detach().to(target[name].dtype).contiguous()
    missing = [k for k in target if k not in converted]
    for name in [k for k in missing if k.endswith("num_batches_tracked")]:
        converted[name] = torch.zeros_like(target[name])
    missing = [k for k in target if k not in converted]
    if missing:
        raise ManifestError(
            f"{checkpoint}: {len(missing)} weights missing, e.g. {missing[:3]}; "
            "not a DenseNet-121 CheXNet checkpoint"
        )

    weights_path = model_dir / manifest.weights.file
    tmp = weights_path.with_suffix(".tmp")
    save_file(converted, str(tmp))
    tmp.replace(weights_path)
    _rewrite_sha256(model_dir / MANIFEST_FILE, sha256_file(weights_path))
    load_manifest(model_dir)  # still valid
    print(
        f"imported {checkpoint} into {weights_path}; manifest sha256 updated. "
        f"Reminder: update {model_dir / 'MODEL_CARD.md'} and the manifest's `synthetic` flag, "
        "label thresholds and `reported` flags for these weights."
    )
    return weights_path


def _rewrite_sha256(manifest_path: Path, sha256: str) -> None:
    """Replace the sha256 line in the ``[weights]`` table, leaving the rest as written."""
    text = manifest_path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    table = None
    done = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            table = stripped
        elif table == "[weights]" and re.match(r"sha256\s*=", stripped):
            lines[i] = f'sha256 = "{sha256}"\n'
            done = True
            break
    if not done:
        raise ManifestError(f"{manifest_path}: no sha256 in a [weights] table")
    new_text = "".join(lines)
    tomllib.loads(new_text)
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(new_text, encoding="utf-8")
    tmp.replace(manifest_path)
