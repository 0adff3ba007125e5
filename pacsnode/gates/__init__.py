"""Input gates: checks that run before a model reads a series, so it reads only what it was made for.

Three kinds, in the order the node applies them:

* header scope (:mod:`pacsnode.scope`): body part, descriptions, view, patient age;
* content (:mod:`pacsnode.gates.radiograph`, :mod:`pacsnode.gates.ct`): small networks that
  look at the pixels and do not trust the header ("is this a frontal chest radiograph?",
  "is this CT chest or abdomen, with or without contrast?");
* out of distribution (:mod:`pacsnode.gates.ood`): how far the model's own features of an
  input lie from those of its training data.

A failed gate is a :class:`GateVerdict` with a reason a radiologist reads; what the node
does with it (decline or flag) is the site's choice per model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from pacsnode.manifest import WeightsSpec, load_toml, verified_file

GATE_FILE = "gate.toml"
"""Each gate folder's description: name, version, kind, classes, input, weights + sha256."""


@dataclass(frozen=True)
class GateVerdict:
    """The outcome of one gate for one input.

    ``reason`` is None when the input passed, else a phrase a radiologist reads, e.g.
    ``"image does not look like a frontal chest radiograph (score 0.03, needs 0.50)"``.
    ``scores`` holds the numbers behind it (for the SR and the logs).
    """

    passed: bool
    reason: str | None = None
    scores: dict[str, float] = field(default_factory=dict)


def verified_gate_weights(gate_dir: Path, name: str, file: str, sha256: str) -> Path:
    """The gate's weights file after checking its sha256 against ``gate.toml``."""
    return verified_file(
        gate_dir / file,
        sha256,
        f"gate {name}",
        str(gate_dir / GATE_FILE),
        "retrain the gate or fix gate.toml",
    )


class GateHeader(BaseModel):
    """What every ``gate.toml`` says whatever its kind (for listings): each gate module
    validates its whole file with its own spec."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    version: str
    kind: str
    synthetic: bool
    weights: WeightsSpec


def gate_header(gate_dir: Path) -> GateHeader:
    """The common part of ``gate_dir/gate.toml``; :class:`ManifestError` names the file."""
    return load_toml(gate_dir / GATE_FILE, GateHeader, GATE_FILE)
