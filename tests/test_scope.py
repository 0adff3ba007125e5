"""Header scope (pacsnode.scope): the shipped manifests decline what their models were not
made for, whatever synonym or description a site writes, and say why in words."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from pacsnode import scope
from pacsnode.manifest import load_manifest

MODELS = Path(__file__).resolve().parents[1] / "models"
CXR = load_manifest(MODELS / "cxr-chexnet")
PE = load_manifest(MODELS / "ct-pe")
KIDNEY = load_manifest(MODELS / "ct-kidney")


def _header(**values: str) -> Dataset:
    ds = Dataset()
    ds.Modality = "CR"
    ds.ViewPosition = "PA"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _check(manifest, **values: str) -> scope.Refusal | None:  # type: ignore[no-untyped-def]
    return scope.check(scope.facts(_header(**values)), manifest.accepts, manifest.name)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # sites write lower case
@pytest.mark.parametrize(
    "body_part", ["CHEST", "THORAX", "Lung", "chest pa", "PORT CHEST", "Brustkorb", "TÓRAX", ""]
)
def test_chest_synonyms_and_an_empty_body_part_are_admitted(body_part: str) -> None:
    assert _check(CXR, BodyPartExamined=body_part, PatientAge="045Y") is None


@pytest.mark.parametrize(
    ("values", "kind", "words"),
    [
        ({"BodyPartExamined": "EXTREMITY"}, "body_part", "body part EXTREMITY"),
        ({"BodyPartExamined": "CSPINE"}, "body_part", "body part CSPINE"),
        ({"BodyPartExamined": "SKULL"}, "body_part", "body part SKULL"),
        ({"StudyDescription": "XR KNEE 2 VIEWS"}, "description", "names KNEE"),
        ({"SeriesDescription": "Hand PA"}, "description", "names HAND"),
        ({"ProtocolName": "C-Spine AP"}, "description", "names C SPINE"),
        ({"StudyDescription": "Paediatric chest"}, "description", "names PAEDIATRIC"),
        ({"SeriesDescription": "CHEST LAT"}, "view", "LAT view"),
        ({"ViewPosition": "LL"}, "view", "view position LL"),
        ({"PatientAge": "006Y"}, "age", "6 years"),
        ({"PatientAge": "010M"}, "age", "10 months"),
        ({"PatientBirthDate": "20200301", "StudyDate": "20261207"}, "age", "6 years"),
    ],
)
def test_cxr_refusals_name_the_culprit(values: dict[str, str], kind: str, words: str) -> None:
    refusal = _check(CXR, **values)
    assert refusal is not None and refusal.kind == kind
    assert words in refusal.reason
    assert "Error" not in refusal.reason


def test_a_confirming_word_beside_a_refused_one_does_not_refuse() -> None:
    assert _check(CXR, StudyDescription="CHEST AND ABDOMEN", PatientAge="060Y") is None


def test_a_lateral_named_by_the_study_does_not_refuse_its_pa_image() -> None:
    """Study Description "CHEST PA AND LATERAL" covers both images; only the image's own
    description or view says which one it is."""
    assert _check(CXR, StudyDescription="CHEST PA AND LATERAL") is None
    refusal = _check(CXR, StudyDescription="CHEST PA AND LATERAL", SeriesDescription="LATERAL")
    assert refusal is not None and refusal.kind == "view"


def test_adults_and_unknown_ages_are_admitted() -> None:
    assert _check(CXR, PatientAge="018Y") is None
    assert _check(CXR, PatientBirthDate="19500101", StudyDate="20261207") is None
    assert _check(CXR, PatientAge="") is None  # unknown: the content gate still looks


def test_ct_models_each_take_their_region() -> None:
    for body_part in ("CHEST", "THORAX"):
        assert _check(PE, BodyPartExamined=body_part) is None
        assert _check(KIDNEY, BodyPartExamined=body_part) is not None
    for body_part in ("ABDOMEN", "ABD PELVIS", "KIDNEYS"):
        assert _check(KIDNEY, BodyPartExamined=body_part) is None
        assert _check(PE, BodyPartExamined=body_part) is not None
    refusal = _check(PE, BodyPartExamined="HEAD")
    assert refusal is not None and "body part HEAD is outside this model's scope" in refusal.reason


def test_real_radiographs_from_pydicom_data() -> None:
    """RG3 is a real CR of a lower leg (Body Part EXTREMITY), RG1 a real CR chest PA."""
    leg = dcmread(get_testdata_file("RG3_UNCR.dcm"), stop_before_pixels=True)
    chest = dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    refusal = scope.check(scope.facts(leg), CXR.accepts, CXR.name)
    assert refusal is not None and refusal.kind == "body_part"
    assert "EXTREMITY" in refusal.reason
    assert scope.check(scope.facts(chest), CXR.accepts, CXR.name) is None
