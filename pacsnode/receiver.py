"""The DICOM receiver: C-ECHO and C-STORE SCP.

The C-STORE handler is deliberately thin: read the identifying header
attributes, write the encoded dataset as received to the spool (fsync + rename),
record one row, and only then answer success. Decoding pixels and inference
happen elsewhere, never on the association thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacsnode import eventlog
from pacsnode.config import Config
from pacsnode.db import utcnow
from pacsnode.errors import InvalidDatasetError, PacsnodeError
from pacsnode.spool import is_valid_uid, spool_path, sweep_temp_files, write_durably
from pacsnode.status import (
    DatabaseUnavailableError,
    DatasetMismatchError,
    StoreStatus,
    UidMismatchError,
    UndecodableDatasetError,
    status_dataset,
    store_status_for,
)
from pacsnode.tables import Instance, Series, Study
from pacsnode.wellformed import check_stream

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    CTImageStorage,
    EnhancedCTImageStorage,
)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

_HEADER_TAGS = [
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ViewPosition",
]


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes the receiver needs to place and record an instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    view_position: str
    transfer_syntax_uid: str


def read_header(
    encoded: bytes, request_sop_class: str, request_sop_instance: str
) -> InstanceHeader:
    """Parse the identifying attributes from a Part 10 byte stream; reject what we cannot file."""
    try:
        ds = dcmread(BytesIO(encoded), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        values = {tag: str(ds.get(tag, "") or "").strip() for tag in _HEADER_TAGS[1:]}
        ts = str(ds.file_meta.TransferSyntaxUID)
    except (InvalidDicomError, ValueError, KeyError, EOFError, OSError, AttributeError) as exc:
        raise UndecodableDatasetError(f"dataset does not parse: {exc}") from exc
    missing = [tag for tag in _HEADER_TAGS[1:6] if not values[tag]]
    if missing:
        raise InvalidDatasetError(f"missing {', '.join(missing)}")
    for tag in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not is_valid_uid(values[tag]):
            raise InvalidDatasetError(f"invalid {tag} {values[tag][:40]!r}")
    if values["SOPClassUID"] != request_sop_class:
        raise DatasetMismatchError(
            f"SOPClassUID {values['SOPClassUID']} differs from request {request_sop_class}"
        )
    if values["SOPInstanceUID"] != request_sop_instance:
        raise UidMismatchError("SOPInstanceUID differs from the C-STORE request")
    return InstanceHeader(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
        modality=values["Modality"][:16],
        view_position=values["ViewPosition"][:16],
        transfer_syntax_uid=ts,
    )


def record_instance(
    session: Session,
    header: InstanceHeader,
    path: Path,
    size: int,
    calling_aet: str,
    now: datetime,
) -> bool:
    """Upsert the study, series and instance rows; True when the instance is new.

    A second copy of the same SOP instance replaces the file and bumps
    ``receive_count`` without counting twice in the series.
    """
    study = session.scalar(select(Study).where(Study.study_uid == header.study_uid))
    if study is None:
        study = Study(study_uid=header.study_uid, created_at=now)
        session.add(study)
        session.flush()
    series = session.scalar(select(Series).where(Series.series_uid == header.series_uid))
    if series is None:
        series = Series(
            series_uid=header.series_uid,
            study_id=study.id,
            modality=header.modality,
            calling_aet=calling_aet,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
        )
        session.add(series)
        session.flush()
    series.last_received_at = now
    instance = session.scalar(
        select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
    )
    if instance is None:
        session.add(
            Instance(
                sop_instance_uid=header.sop_instance_uid,
                series_id=series.id,
                sop_class_uid=header.sop_class_uid,
                transfer_syntax_uid=header.transfer_syntax_uid,
                view_position=header.view_position,
                path=str(path),
                size_bytes=size,
                received_at=now,
                receive_count=1,
            )
        )
        series.instance_count += 1
        return True
    instance.receive_count += 1
    instance.received_at = now
    instance.size_bytes = size
    instance.transfer_syntax_uid = header.transfer_syntax_uid
    instance.view_position = header.view_position
    instance.path = str(path)
    if instance.series_id != series.id:
        # the newest copy wins: the instance now belongs to the series it was last sent in
        previous = session.get(Series, instance.series_id)
        if previous is not None:
            previous.instance_count -= 1
        instance.series_id = series.id
        series.instance_count += 1
        eventlog.record(
            session,
            "instance-moved",
            f"instance {header.sop_instance_uid} re-sent in another series",
            now,
            level="warning",
            study_uid=header.study_uid,
            series_uid=header.series_uid,
        )
    return False


class StoreHandler:
    """Handles EVT_C_STORE; its dependencies come in through the constructor, not globals."""

    def __init__(
        self,
        spool_dir: Path,
        sessions: sessionmaker[Session],
        on_stored: Callable[[], None] = lambda: None,
    ) -> None:
        self.spool_dir = spool_dir
        self.sessions = sessions
        self.on_stored = on_stored

    def __call__(self, event: Event) -> Any:
        request = cast(C_STORE, event.request)
        calling_aet = str(event.assoc.requestor.ae_title).strip()
        try:
            stream = event.encoded_dataset(include_meta=False)
            check_stream(stream, str(event.file_meta.TransferSyntaxUID))
            encoded = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(event.file_meta), stream))
            header = read_header(
                encoded,
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
            )
            path = spool_path(
                self.spool_dir, header.study_uid, header.series_uid, header.sop_instance_uid
            )
            write_durably(path, encoded)
            try:
                with self.sessions.begin() as session:
                    record_instance(session, header, path, len(encoded), calling_aet, utcnow())
            except OperationalError as exc:
                raise DatabaseUnavailableError(f"database unavailable: {exc.orig}") from exc
        except PacsnodeError as exc:
            status = store_status_for(exc)
            log.warning("C-STORE from %s refused with 0x%04X: %s", calling_aet, int(status), exc)
            return status_dataset(status, str(exc))
        self.on_stored()
        return status_dataset(StoreStatus.SUCCESS)


def _handle_echo(event: Event) -> int:
    return 0x0000


def build_ae(config: Config) -> AE:
    """The application entity with our presentation contexts and access rules."""
    node = config.node
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_size
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.require_called_aet = True
    if node.allowed_calling_aets:
        ae.require_calling_aet = list(node.allowed_calling_aets)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


class Receiver:
    """The SCP as a component of the node: ``initialize`` binds the port, ``shutdown`` closes it."""

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        on_stored: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.handler = StoreHandler(config.storage.spool_dir, sessions, on_stored)
        self.server: ThreadedAssociationServer | None = None

    def initialize(self) -> None:
        spool = self.config.storage.spool_dir
        spool.mkdir(parents=True, exist_ok=True)
        removed = sweep_temp_files(spool)
        if removed:
            log.warning("removed %d partial files left in %s by an earlier crash", removed, spool)
        ae = build_ae(self.config)
        self.server = ae.start_server(
            (self.config.node.host, self.config.node.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.handler), (evt.EVT_C_ECHO, _handle_echo)],
        )
        log.info(
            "receiver %s listening on %s:%d",
            self.config.node.ae_title,
            self.config.node.host,
            self.config.node.port,
        )

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
