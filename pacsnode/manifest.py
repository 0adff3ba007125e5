"""Model manifests: what a model accepts, what it reports, and which weights it trusts.

Every model folder under ``models/`` holds ``manifest.toml``, the weights and a
model card. The router reads ``accepts``; the writers read ``labels``; the loader
refuses weights whose sha256 differs from the manifest.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydicom.sr.coding import Code

from pacsnode.errors import ManifestError, WeightsMismatchError

MANIFEST_FILE = "manifest.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    """A coded concept, e.g. SNOMED CT ``SCT 60046008 Pleural effusion``."""

    scheme: str
    value: str
    meaning: str

    def to_code(self) -> Code:
        return Code(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)


class LabelSpec(_Strict):
    """One model output; only ``reported`` labels appear in results sent to the PACS."""

    name: str
    reported: bool = False
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    code: CodeSpec | None = None
    level: Literal["image", "exam", "segment"] = "image"
    """``image``: one value per image or slice; ``exam``: one value per series (CT PE exam
    labels); ``segment``: one binary segment of a DICOM SEG (CT kidney); ``code`` is then the
    Segmented Property Type."""
    category: CodeSpec | None = None
    """Segments only: the Segmented Property Category (e.g. SCT 91723000 Anatomical Structure)."""
    anatomic_region: CodeSpec | None = None
    """Segments only: where a finding segment lies (e.g. SCT 64033007 Kidney for a tumour)."""

    @model_validator(mode="after")
    def _reported_needs_code(self) -> LabelSpec:
        if self.reported and self.code is None:
            raise ValueError(f"label {self.name!r} is reported but has no code")
        if self.level == "segment" and (self.code is None or self.category is None):
            raise ValueError(f"segment {self.name!r} needs a code and a category")
        if self.level != "segment" and (self.category or self.anatomic_region):
            raise ValueError(f"label {self.name!r}: category/anatomic_region are for segments")
        return self


class ScopeSpec(_Strict):
    """``[accepts.scope]``: the anatomy and patients a model reads, judged from the header
    (see :mod:`pacsnode.scope`) and, with ``content_gate``, from the pixels."""

    body_parts: list[str] = []
    """Accepted Body Part Examined terms (CID 4031: CHEST, ABDOMEN...); a site's synonyms
    (THORAX, LUNG...) count as the term. Empty: any body part."""
    missing_body_part: Literal["accept", "confirm", "refuse"] = "accept"
    """An empty Body Part Examined: accepted; accepted only when a description names one of
    ``confirm_words``; or refused."""
    refuse_words: list[str] = []
    """Words or phrases in Study/Series Description, Protocol Name or Requested Procedure
    Description that put the input out of scope (HAND, KNEE, PAEDIATRIC...)."""
    refuse_population_words: list[str] = []
    """Words in those descriptions that refuse whatever else they say: patients the model
    was not made for (PAEDIATRIC, NEONATAL...)."""
    confirm_words: list[str] = []
    """Words that confirm the anatomy; a description naming one is not refused by a
    ``refuse_words`` word beside it ("CHEST AND HAND")."""
    refuse_view_words: list[str] = []
    """Words in Series Description, Protocol Name or View Code that name a view the model
    does not read (LATERAL, DECUBITUS...); Study Description is not read for these."""
    min_age_years: float | None = Field(None, ge=0)
    """Adult-only models: refuse a patient younger than this (Patient Age, or birth date
    against study date); an unknown age is accepted."""
    content_gate: str | None = None
    """Folder under ``models/gates/`` of the content gate run on the pixels before the
    model (``radiograph-view``, ``ct-region-contrast``); None: no content gate."""
    regions: list[Literal["chest", "abdomen", "other"]] = []
    """CT models: the body regions the content gate must see (empty: any)."""


class CtCriteria(_Strict):
    """Which CT series of a study a volume model accepts (see :mod:`pacsnode.selection`);
    the body part is judged by ``[accepts.scope]``."""

    max_slice_thickness_mm: float = Field(3.0, gt=0)
    require_contrast: bool = False
    """Refuse a series without intravenous contrast: judged by the content gate when the
    model has one (headers lie), else from the header (a silent header is accepted)."""
    prefer_contrast: bool = False
    """Rank a series whose header names a contrast agent above one that does not (first rule)."""
    min_slices: int = Field(20, ge=2)


class Accepts(_Strict):
    """What the router may send to this model."""

    modalities: list[str]
    sop_classes: list[str] = []
    view_positions: list[str] = []  # empty: any; "" in the list admits a missing ViewPosition
    scope: ScopeSpec = ScopeSpec()
    ct: CtCriteria | None = None
    """Set for volume models: one series per study is selected by :mod:`pacsnode.selection`."""


class InputSpec(_Strict):
    size: int = 224
    channels: int = 3
    mean: list[float] = [0.485, 0.456, 0.406]
    std: list[float] = [0.229, 0.224, 0.225]
    window_center: float | None = None  # CT models: HU window applied before the network
    window_width: float | None = None


class WeightsSpec(_Strict):
    file: str = "weights.safetensors"
    sha256: str


class OodSpec(_Strict):
    """``[ood]``: the out-of-distribution statistics (:mod:`pacsnode.gates.ood`)."""

    file: str = "ood.safetensors"
    sha256: str


class Manifest(_Strict):
    """The parsed ``manifest.toml`` of one model folder."""

    name: str
    version: str
    kind: str  # selects the implementation, e.g. "cxr-densenet121"
    description: str = ""
    synthetic: bool = Field(
        description="weights trained on synthetic phantoms: outputs are not for clinical use"
    )
    batch_size: int = Field(8, ge=1)
    accepts: Accepts
    input: InputSpec = InputSpec()
    weights: WeightsSpec
    ood: OodSpec | None = None
    labels: list[LabelSpec]

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def reported_labels(self) -> list[LabelSpec]:
        return [label for label in self.labels if label.reported]

    @property
    def exam_labels(self) -> list[LabelSpec]:
        return [label for label in self.labels if label.level == "exam"]

    @property
    def image_labels(self) -> list[LabelSpec]:
        return [label for label in self.labels if label.level == "image"]

    @property
    def segment_labels(self) -> list[LabelSpec]:
        """Segments in manifest order; the SEG's segment number is the 1-based index here."""
        return [label for label in self.labels if label.level == "segment"]


SpecT = TypeVar("SpecT", bound=BaseModel)


def load_toml(path: Path, spec: type[SpecT], what: str) -> SpecT:
    """Parse ``path`` and validate it as ``spec``; every problem is a :class:`ManifestError`
    naming the file and the key (``what``: "manifest", "gate.toml" in the message)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no {what}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return spec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ManifestError(f"{path}: {problems}") from exc


def load_manifest(model_dir: Path) -> Manifest:
    """Parse and validate ``model_dir/manifest.toml``."""
    return load_toml(model_dir / MANIFEST_FILE, Manifest, "manifest")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_file(path: Path, sha256: str, owner: str, pinned_in: str, fix: str) -> Path:
    """``path`` after checking it exists and has ``sha256``, the value ``pinned_in`` records;
    ``owner`` ("model cxr-chexnet") and ``fix`` (what to do) go into the message."""
    if not path.is_file():
        raise ManifestError(f"{owner}: file {path} is missing")
    actual = sha256_file(path)
    if actual != sha256:
        raise WeightsMismatchError(
            f"{owner}: {path} has sha256 {actual}, {pinned_in} expects {sha256}; "
            f"refusing to load ({fix})"
        )
    return path


def verified_weights_path(model_dir: Path, manifest: Manifest) -> Path:
    """Return the weights path after checking its sha256 against the manifest."""
    return verified_file(
        model_dir / manifest.weights.file,
        manifest.weights.sha256,
        f"model {manifest.name}",
        "manifest",
        "re-import the weights or fix the manifest",
    )


def load_enabled(models_dir: Path, names: list[str]) -> list[Manifest]:
    """Manifests of the enabled models, in config order; a missing folder is an error."""
    manifests = []
    for name in names:
        manifest = load_manifest(models_dir / name)
        if manifest.name != name:
            raise ManifestError(
                f"{models_dir / name}: manifest name {manifest.name!r} differs from its folder"
            )
        manifests.append(manifest)
    return manifests
