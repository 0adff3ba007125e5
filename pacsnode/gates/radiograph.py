"""Content gate for radiographs: "is this a frontal chest radiograph?", from the pixels only.

A small MONAI ResNet classifies the whole image into body part and view classes (frontal
chest, lateral chest, lower leg, knee, hand, foot, cervical and lumbar spine, skull, abdomen,
pelvis; the list is in ``gate.toml``). The image passes when the probability of the accepted
class (``frontal_chest``) reaches the threshold. The header is never read: a lower leg
labelled ``BodyPartExamined = CHEST``, ``ViewPosition = PA`` is refused all the same.

Preprocessing (:func:`display_to_input`, shared with training): the display image of
:func:`pacsnode.pixels.to_display_array` (bright = dense, VOI applied, MONOCHROME1 inverted)
is shrunk so that its long side is ``input.size`` (antialiased), keeping its aspect, and
letterboxed onto a black square: a tall, thin leg stays tall and thin.

The folder holds ``gate.toml``, the weights (sha256 checked before loading) and a model card.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom.dataset import Dataset

from pacsnode.gates import GATE_FILE, GateVerdict, verified_gate_weights
from pacsnode.manifest import load_toml
from pacsnode.models.base import load_state
from pacsnode.pixels import to_display_array

PAD_VALUE = 0.0
INPUT_MEAN = 0.5
INPUT_STD = 0.25


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GateClass(_Strict):
    """One output class and the words a radiologist reads for it."""

    name: str
    description: str  # e.g. "a lower-leg radiograph"


class GateInput(_Strict):
    size: int = Field(128, ge=16, le=1024)


class GateNetwork(_Strict):
    """``monai.networks.nets.ResNet`` (basic blocks, 2D, one input channel)."""

    layers: list[int] = [1, 1, 1, 1]
    block_inplanes: list[int] = [16, 32, 64, 128]


class GateWeights(_Strict):
    file: str = "weights.safetensors"
    sha256: str


class GateSpec(_Strict):
    """The parsed ``gate.toml``."""

    name: str
    version: str
    kind: str
    description: str = ""
    synthetic: bool
    classes: list[GateClass]
    accepted: str
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    batch_size: int = Field(8, ge=1)
    input: GateInput = GateInput()
    network: GateNetwork = GateNetwork()
    weights: GateWeights

    @model_validator(mode="after")
    def _accepted_is_a_class(self) -> GateSpec:
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"classes: duplicate names in {names}")
        if self.accepted not in names:
            raise ValueError(f"accepted class {self.accepted!r} is not one of {names}")
        if len(names) < 2:
            raise ValueError("classes: a gate needs at least two")
        return self


def load_gate_spec(gate_dir: Path) -> GateSpec:
    """Parse and validate ``gate_dir/gate.toml``."""
    return load_toml(gate_dir / GATE_FILE, GateSpec, GATE_FILE)


def build_network(spec: GateSpec) -> torch.nn.Module:
    return ResNet(
        "basic",
        spec.network.layers,
        spec.network.block_inplanes,
        spatial_dims=2,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        num_classes=len(spec.classes),
    )


def display_to_input(image: np.ndarray, size: int) -> torch.Tensor:
    """Display image (2D, [0, 1], bright = dense) to the ``1×size×size`` network input.

    Shrinks the long side to ``size`` (antialiased bilinear, area-like), keeps the aspect,
    centres it on a :data:`PAD_VALUE` square, then normalises. Training uses this function.
    """
    if image.ndim != 2:
        raise ValueError(f"image: expected a 2D display image, got shape {image.shape}")
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    rows, cols = image.shape
    scale = size / max(rows, cols)
    h, w = max(1, round(rows * scale)), max(1, round(cols * scale))
    if (h, w) != (rows, cols):
        t = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    out = torch.full((1, size, size), PAD_VALUE, dtype=torch.float32)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top : top + h, left : left + w] = t[0].clamp_(0.0, 1.0)
    return (out - INPUT_MEAN) / INPUT_STD


def preprocess(ds: Dataset, size: int) -> torch.Tensor:
    """The network input for one dataset; :class:`~pacsnode.errors.InputError` if undecodable."""
    return display_to_input(to_display_array(ds), size)


def _words(name: str) -> str:
    return name.replace("_", " ")


class RadiographGate:
    """The radiograph content gate: one :class:`GateVerdict` per image, header ignored."""

    def __init__(self, spec: GateSpec, network: torch.nn.Module, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self.network = network.to(device).eval()
        self._descriptions = {c.name: c.description for c in spec.classes}
        self._accepted_index = self.classes().index(spec.accepted)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def synthetic(self) -> bool:
        return self.spec.synthetic

    @property
    def threshold(self) -> float:
        return self.spec.threshold

    @property
    def input_size(self) -> int:
        return self.spec.input.size

    def classes(self) -> list[str]:
        """Output classes in network order; :attr:`GateSpec.accepted` is one of them."""
        return [c.name for c in self.spec.classes]

    @classmethod
    def load(cls, gate_dir: Path, device: torch.device) -> RadiographGate:
        """Load ``gate_dir`` after checking the weights' sha256 against ``gate.toml``."""
        spec = load_gate_spec(gate_dir)
        path = verified_gate_weights(gate_dir, spec.name, spec.weights.file, spec.weights.sha256)
        network = load_state(build_network(spec), path, f"gate {spec.name}", device)
        return cls(spec, network, device)

    def probabilities(self, inputs: torch.Tensor) -> np.ndarray:
        """Softmax over :meth:`classes` for a batch of inputs (N×1×size×size)."""
        out = []
        with torch.inference_mode():
            for start in range(0, inputs.shape[0], self.spec.batch_size):
                chunk = inputs[start : start + self.spec.batch_size].to(self.device)
                out.append(torch.softmax(self.network(chunk).float(), dim=1).cpu())
        if not out:
            return np.zeros((0, len(self.spec.classes)), dtype=np.float32)
        return torch.cat(out).numpy()

    def verdict(self, probs: np.ndarray) -> GateVerdict:
        """The verdict for one probability vector (in :meth:`classes` order)."""
        names = self.classes()
        scores = {name: round(float(p), 4) for name, p in zip(names, probs, strict=True)}
        p_accept = float(probs[self._accepted_index])
        others = [i for i in range(len(names)) if i != self._accepted_index]
        top = max(others, key=lambda i: float(probs[i]))
        if p_accept >= self.threshold:
            return GateVerdict(passed=True, reason=None, scores=scores)
        accepted = self.spec.accepted
        numbers = f"{_words(accepted)} {p_accept:.2f}, needs ≥ {self.threshold:.2f}"
        if float(probs[top]) > p_accept:
            reason = (
                f"image looks like {self._descriptions[names[top]]}, not "
                f"{self._descriptions[accepted]} ({numbers})"
            )
        else:
            reason = (
                f"image does not clearly look like {self._descriptions[accepted]} ({numbers}; "
                f"next most like {self._descriptions[names[top]]}, {float(probs[top]):.2f})"
            )
        return GateVerdict(passed=False, reason=reason, scores=scores)

    def check(self, datasets: Sequence[Dataset]) -> list[GateVerdict]:
        """One verdict per dataset, in order, from one batched forward pass.

        Decoding problems raise :class:`~pacsnode.errors.InputError` (naming the instance).
        """
        if not datasets:
            return []
        inputs = torch.stack([preprocess(ds, self.input_size) for ds in datasets])
        return [self.verdict(p) for p in self.probabilities(inputs)]
