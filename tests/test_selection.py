"""CT series selection: qualification, the choice rule, and the reasons routing records."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from dicomgen import CT_IMAGE, image_dataset, save
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsnode import completion, routing, scope, selection
from pacsnode.config import CompletionConfig
from pacsnode.db import make_engine, make_sessionmaker, upgrade
from pacsnode.manifest import Accepts, CtCriteria, LabelSpec, Manifest, ScopeSpec, WeightsSpec
from pacsnode.receiver import InstanceHeader, record_instance
from pacsnode.tables import Job, JobState, RoutingDecision, Series

T0 = datetime(2026, 1, 1, 8, 0, 0)
STUDY = "1.2.826.0.1.3680043.10.1.1"
CRITERIA = CtCriteria(max_slice_thickness_mm=3.0, require_contrast=True)
SCOPE = ScopeSpec(body_parts=["CHEST"])


def pe_manifest() -> Manifest:
    return Manifest(
        name="ct-pe",
        version="1",
        kind="ct-pe-2d-gru",
        synthetic=True,
        accepts=Accepts(modalities=["CT"], sop_classes=[CT_IMAGE], ct=CRITERIA, scope=SCOPE),
        weights=WeightsSpec(sha256="0" * 64),
        labels=[LabelSpec(name="pe_present_on_image")],
    )


def ct_header(
    *,
    series_uid: str,
    number: int,
    thickness: float = 1.0,
    kernel: str = "B30f",
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    description: str = "CTPA",
    contrast: str | None = "Iohexol",
    body_part: str = "CHEST",
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
) -> Dataset:
    ds = image_dataset(study_uid=STUDY, series_uid=series_uid)
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.SliceThickness = thickness
    ds.ConvolutionKernel = kernel
    ds.ImageType = image_type.split("\\")
    ds.BodyPartExamined = body_part
    ds.ImageOrientationPatient = list(orientation)
    if contrast is not None:
        ds.ContrastBolusAgent = contrast
    return ds


def summary(ds: Dataset, slices: int = 100) -> selection.SeriesSummary:
    return selection.summarize(ds, slices)


@pytest.mark.parametrize(
    ("kernel", "description", "family"),
    [
        ("B30f", "", "soft-tissue"),
        ("Br40d", "", "soft-tissue"),
        ("Bl57d", "", "lung"),
        ("B70f", "", "lung"),
        ("STANDARD", "", "soft-tissue"),
        ("LUNG", "", "lung"),
        ("BONEPLUS", "", "bone"),
        ("", "Thorax 1.0 lung window", "lung"),
        ("", "", "unknown"),
    ],
)
def test_kernel_family(kernel: str, description: str, family: str) -> None:
    assert selection.kernel_family(kernel, description) == family


def in_scope(s: selection.SeriesSummary) -> str | None:
    assert s.facts is not None
    refusal = scope.check(s.facts, pe_manifest().accepts, "ct-pe")
    return refusal.reason if refusal else None


def test_qualify_names_each_reason() -> None:
    ok = summary(ct_header(series_uid="1.1", number=2))
    assert selection.qualify(ok, CRITERIA, in_scope) is None
    cases = {
        "localizer": ct_header(
            series_uid="1.2", number=1, image_type="ORIGINAL\\PRIMARY\\LOCALIZER"
        ),
        "above the 3 mm limit": ct_header(series_uid="1.3", number=3, thickness=5.0),
        "header says no contrast": ct_header(series_uid="1.4", number=4, contrast="NONE"),
        "body part HEAD": ct_header(series_uid="1.5", number=5, body_part="HEAD"),
        "coronal slices": ct_header(series_uid="1.6", number=6, orientation=(1, 0, 0, 0, 0, -1)),
    }
    for expected, ds in cases.items():
        reason = selection.qualify(summary(ds), CRITERIA, in_scope)
        assert reason is not None and expected in reason, (expected, reason)
    few = summary(ct_header(series_uid="1.7", number=7), slices=5)
    assert "5 slices" in (selection.qualify(few, CRITERIA) or "")
    silent = summary(ct_header(series_uid="1.8", number=8, contrast=None))
    assert selection.qualify(silent, CRITERIA) is None


def test_choose_thinnest_then_most_slices_then_soft_tissue() -> None:
    thin_lung = summary(ct_header(series_uid="2.1", number=3, kernel="Bl57d"), 300)
    thin_soft = summary(ct_header(series_uid="2.2", number=4, kernel="B30f"), 300)
    thin_fewer = summary(ct_header(series_uid="2.3", number=5, kernel="B30f"), 250)
    thicker = summary(ct_header(series_uid="2.4", number=2, thickness=2.0), 400)
    choice = selection.choose([thicker, thin_lung, thin_fewer, thin_soft], CRITERIA)
    assert choice.chosen is not None and choice.chosen.series_uid == "2.2"
    assert "thinner" in choice.reasons["2.4"]
    assert "more slices" in choice.reasons["2.3"]
    assert "preferred kernel" in choice.reasons["2.1"]
    assert choice.reasons["2.2"].startswith("selected: 1 mm, 300 slices, soft-tissue kernel")
    assert selection.choose([], CRITERIA).chosen is None


def test_prefer_contrast_ranks_a_named_agent_before_a_thinner_silent_series() -> None:
    """A multiphase abdomen study: the non-contrast phase is as thin as the venous phase."""
    criteria = CRITERIA.model_copy(update={"require_contrast": False, "prefer_contrast": True})
    plain = summary(ct_header(series_uid="3.1", number=2, thickness=0.75, contrast=None), 400)
    stated_no = summary(ct_header(series_uid="3.2", number=3, thickness=0.75, contrast="NONE"))
    venous = summary(ct_header(series_uid="3.3", number=4, contrast="Iohexol"), 300)
    choice = selection.choose([plain, stated_no, venous], criteria)
    assert choice.chosen is not None and choice.chosen.series_uid == "3.3"
    assert "contrast in its header (Iohexol)" in choice.reasons["3.1"]
    assert "contrast in its header" in choice.reasons["3.2"]
    # without the preference the thinner silent series wins, as for the PE model
    assert selection.choose([plain, venous], CRITERIA).chosen == plain
    # with no contrast series at all the ordinary rule still chooses
    assert selection.choose([plain, stated_no], criteria).chosen == plain


# ------------------------------------------------------------------ routing with real headers


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    return make_sessionmaker(engine)


def receive_series(
    session: Session, tmp_path: Path, ds: Dataset, count: int, now: datetime
) -> None:
    """Record ``count`` instances of ``ds``'s series; one real file carries the header."""
    path = save(ds, tmp_path / f"{ds.SeriesInstanceUID}.dcm")
    for i in range(count):
        header = InstanceHeader(
            sop_class_uid=CT_IMAGE,
            sop_instance_uid=f"{ds.SeriesInstanceUID}.{i + 1}",
            study_uid=STUDY,
            series_uid=str(ds.SeriesInstanceUID),
            modality="CT",
            view_position="",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        record_instance(session, header, path, 0, "SCANNER", now)


def decisions(session: Session) -> dict[str, RoutingDecision]:
    rows = session.execute(
        select(Series.series_uid, RoutingDecision).join(
            RoutingDecision, RoutingDecision.series_id == Series.id
        )
    ).all()
    return {uid: d for uid, d in rows}


def route_due(session: Session, now: datetime) -> list[Job]:
    jobs = []
    for series in completion.complete_due_series(session, CompletionConfig(), now):
        jobs += routing.route_series(session, series, [pe_manifest()], now)
    return jobs


def test_routing_picks_ctpa_over_scout_thick_and_lung_kernel(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    scout = ct_header(
        series_uid="3.1", number=1, image_type="ORIGINAL\\PRIMARY\\LOCALIZER", thickness=1.0
    )
    ctpa = ct_header(series_uid="3.2", number=2, thickness=1.0, kernel="B30f")
    thick = ct_header(series_uid="3.3", number=3, thickness=5.0, kernel="B30f")
    lung = ct_header(series_uid="3.4", number=4, thickness=1.0, kernel="Bl57d")
    with sessions.begin() as s:
        receive_series(s, tmp_path, scout, 1, T0)
        receive_series(s, tmp_path, ctpa, 60, T0)
    with sessions.begin() as s:
        # the scout completes while the others are still arriving: the choice waits
        receive_series(s, tmp_path, thick, 12, T0 + timedelta(seconds=4))
        receive_series(s, tmp_path, lung, 60, T0 + timedelta(seconds=4))
    with sessions.begin() as s:
        assert route_due(s, T0 + timedelta(seconds=6)) == []
        waiting = decisions(s)
        assert set(waiting) == {"3.1", "3.2"}
        assert all("waiting for series 3.3, 3.4" in d.reason for d in waiting.values())
    with sessions.begin() as s:
        jobs = route_due(s, T0 + timedelta(seconds=10))
        assert [j.series.series_uid for j in jobs] == ["3.2"]
        got = decisions(s)
        assert got["3.2"].accepted and "selected: 1 mm, 60 slices" in got["3.2"].reason
        assert not got["3.1"].accepted and "localizer" in got["3.1"].reason
        assert not got["3.3"].accepted and "5 mm is above the 3 mm limit" in got["3.3"].reason
        assert not got["3.4"].accepted and "preferred kernel" in got["3.4"].reason
    # a late instance of the lung series re-runs the choice but does not rerun the CTPA job
    with sessions.begin() as s:
        job = s.scalars(select(Job)).one()
        job.state = JobState.SUCCEEDED
        receive_series(s, tmp_path, lung, 1, T0 + timedelta(seconds=20))
    with sessions.begin() as s:
        assert route_due(s, T0 + timedelta(seconds=30)) == []
        assert s.scalars(select(Job)).one().state is JobState.SUCCEEDED


def test_study_without_eligible_series_gets_no_job(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions.begin() as s:
        receive_series(s, tmp_path, ct_header(series_uid="4.1", number=2, thickness=5.0), 40, T0)
        receive_series(
            s, tmp_path, ct_header(series_uid="4.2", number=3, contrast="NO CONTRAST"), 40, T0
        )
    with sessions.begin() as s:
        assert route_due(s, T0 + timedelta(seconds=10)) == []
        got = decisions(s)
        assert "above the 3 mm limit" in got["4.1"].reason
        assert "no contrast" in got["4.2"].reason
        assert s.scalars(select(Job)).all() == []
