"""Shared pytest fixtures.

Sections, in order; add new fixtures to the section they belong to:

1. environment checks (session-wide, autouse)
2. real DICOM peers (Orthanc; dcmtk and dciodvfy are plain functions in ``tests/peers.py``)
3. pacsnode under test
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import pytest
from peers import Orthanc, missing_binaries

# -- 1. environment checks -------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def required_binaries() -> None:
    """Fail (not skip) every test when a real peer the suite needs is not installed."""
    missing = missing_binaries()
    if missing:
        pytest.fail(
            f"missing executables {', '.join(missing)}: the tests talk to real DICOM peers "
            "(dcmtk, Orthanc, dicom3tools); run `make test`, which installs them",
            pytrace=False,
        )


# -- 2. real DICOM peers ---------------------------------------------------------------

OrthancFactory = Callable[..., Orthanc]


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancFactory]:
    """Start Orthancs on demand; all are stopped at teardown.

    ``orthanc_factory(aet="ORTHANC", modalities={"NODE": (aet, host, port)}, start=True)``;
    pass ``start=False`` to declare modalities that point at each other before starting.
    """
    started: list[Orthanc] = []

    def make(
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        start: bool = True,
        overwrite_instances: bool = False,
    ) -> Orthanc:
        workdir = tmp_path_factory.mktemp(f"orthanc-{aet.lower()}")
        orthanc = Orthanc(
            aet=aet,
            modalities=modalities,
            workdir=workdir,
            overwrite_instances=overwrite_instances,
        )
        started.append(orthanc)
        return orthanc.start() if start else orthanc

    yield make
    for orthanc in reversed(started):
        orthanc.close()


@pytest.fixture
def orthanc(orthanc_factory: OrthancFactory) -> Orthanc:
    """A running Orthanc (AET ``ORTHANC``) with empty storage and no modalities."""
    return orthanc_factory()


# -- 3. pacsnode under test ------------------------------------------------------------
