"""The DICOM receiver: C-ECHO and C-STORE SCP.

The C-STORE path is deliberately thin: the dataset streams into a spool file as its
fragments arrive; once complete the file is fsynced, checked (element lengths, the
identifying header attributes), renamed into the spool and recorded in the database,
and only then is success answered. Decoding pixels and inference happen elsewhere,
never on the association thread. The wire protocol lives in :mod:`pacsnode.upperlayer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
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
from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacsnode import eventlog
from pacsnode.config import Config
from pacsnode.db import utcnow
from pacsnode.errors import ConfigError, InvalidDatasetError, PacsnodeError, SpoolError
from pacsnode.metrics import Metrics
from pacsnode.spool import IncomingFile, is_valid_uid, spool_path, sweep_temp_files
from pacsnode.status import (
    DatabaseUnavailableError,
    DatasetMismatchError,
    StoreStatus,
    UidMismatchError,
    UndecodableDatasetError,
    store_status_for,
)
from pacsnode.tables import Instance, Series, Study
from pacsnode.upperlayer import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    AcceptorPolicy,
    AccessRule,
    StoreRequest,
    StoreServer,
    server_ssl_context,
)
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
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ViewPosition",
    "AccessionNumber",
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
    accession_number: str = ""  # so `pacsnode requeue --accession` finds the study


_HEADER_TAG_NUMBERS = {keyword: int(tag_for_keyword(keyword) or 0) for keyword in _HEADER_TAGS}


def header_values(path: Path, dataset_offset: int, transfer_syntax: str) -> dict[str, str]:
    """Check the stream's element lengths and return the header attributes, in one pass.

    Streams the walker does not cover (deflated, big endian) go through pydicom.
    """
    data = path.read_bytes()  # just written: a page-cache copy, far cheaper than the fsync
    if len(data) == dataset_offset:
        raise UndecodableDatasetError("empty dataset")
    found: dict[int, bytes] = dict.fromkeys(_HEADER_TAG_NUMBERS.values(), b"")
    if check_stream(memoryview(data)[dataset_offset:], transfer_syntax, found):
        return {
            keyword: found[number].decode("ascii", "replace").strip(" \x00")
            for keyword, number in _HEADER_TAG_NUMBERS.items()
        }
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        return {tag: str(ds.get(tag, "") or "").strip() for tag in _HEADER_TAGS}
    except (InvalidDicomError, ValueError, KeyError, EOFError, OSError, AttributeError) as exc:
        raise UndecodableDatasetError(f"dataset does not parse: {exc}") from exc


def read_header(
    values: dict[str, str], transfer_syntax: str, request_sop_class: str, request_sop_instance: str
) -> InstanceHeader:
    """The identifying attributes, checked; reject what we cannot file."""
    missing = [tag for tag in _HEADER_TAGS[:5] if not values[tag]]
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
        transfer_syntax_uid=transfer_syntax,
        accession_number=values["AccessionNumber"][:16],
    )


# Built once: per-instance statements with bound parameters skip SQLAlchemy's per-call
# statement construction and cache-key work, which cost more than the commit itself.
_STUDY_ID = select(Study.id).where(Study.study_uid == bindparam("b_uid"))
_SERIES_ID = select(Series.id).where(Series.series_uid == bindparam("b_uid"))
_INSTANCE = select(Instance.id, Instance.series_id).where(
    Instance.sop_instance_uid == bindparam("b_uid")
)
_NEW_STUDY = insert(Study).returning(Study.id)
_NEW_SERIES = insert(Series).returning(Series.id)
_NEW_INSTANCE = insert(Instance)
_UPDATE_INSTANCE = (
    update(Instance)
    .where(Instance.id == bindparam("b_id"))
    .values(receive_count=Instance.receive_count + 1)
)
_BUMP_SERIES = (
    update(Series)
    .where(Series.id == bindparam("b_id"))
    .values(
        last_received_at=bindparam("b_now"),
        instance_count=Series.instance_count + bindparam("b_added"),
    )
)


def record_instance(
    session: Session | Connection,
    header: InstanceHeader,
    path: Path,
    size: int,
    calling_aet: str,
    now: datetime,
) -> bool:
    """Upsert the study, series and instance rows; True when the instance is new.

    A second copy of the same SOP instance replaces the file and bumps
    ``receive_count`` without counting twice in the series. Core statements, not ORM
    objects: this runs once per received instance.
    """
    series_id = session.scalar(_SERIES_ID, {"b_uid": header.series_uid})
    if series_id is None:  # a series' study exists once the series does
        study_id = session.scalar(_STUDY_ID, {"b_uid": header.study_uid})
        if study_id is None:
            study_id = session.execute(
                _NEW_STUDY,
                {
                    "study_uid": header.study_uid,
                    "accession_number": header.accession_number,
                    "created_at": now,
                },
            ).scalar_one()
        series_id = session.execute(
            _NEW_SERIES,
            {
                "series_uid": header.series_uid,
                "study_id": study_id,
                "modality": header.modality,
                "calling_aet": calling_aet,
                "instance_count": 0,
                "first_received_at": now,
                "last_received_at": now,
            },
        ).scalar_one()
    existing = session.execute(_INSTANCE, {"b_uid": header.sop_instance_uid}).first()
    values = {
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "view_position": header.view_position,
        "path": str(path),
        "size_bytes": size,
        "received_at": now,
        "series_id": series_id,
    }
    if existing is None:
        session.execute(
            _NEW_INSTANCE,
            {
                "sop_instance_uid": header.sop_instance_uid,
                "sop_class_uid": header.sop_class_uid,
                "receive_count": 1,
                **values,
            },
        )
        _bump_series(session, series_id, now, +1)
        return True
    session.execute(_UPDATE_INSTANCE, {"b_id": existing.id, **values})
    if existing.series_id == series_id:
        _bump_series(session, series_id, now, 0)
        return False
    # the newest copy wins: the instance now belongs to the series it was last sent in
    _bump_series(session, existing.series_id, None, -1)
    _bump_series(session, series_id, now, +1)
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


def _bump_series(
    session: Session | Connection, series_id: int, now: datetime | None, added: int
) -> None:
    if now is None:
        session.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(instance_count=Series.instance_count + added)
        )
        return
    session.execute(_BUMP_SERIES, {"b_id": series_id, "b_now": now, "b_added": added})


@dataclass
class _Pending:
    header: InstanceHeader
    path: Path
    size: int
    calling_aet: str
    done: bool = False
    error: PacsnodeError | None = None


@dataclass
class Recorder:
    """Group commit: instances finishing at the same moment share one transaction.

    Each caller still returns only after the commit holding its own row, so no
    durability is traded away; concurrent associations just pay one WAL fsync
    between them instead of one each. Whoever finds no commit running leads the next
    one for everything queued; the others wait for it.
    """

    sessions: sessionmaker[Session]
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _queue: list[_Pending] = field(default_factory=list)
    _leading: bool = False

    def record(self, header: InstanceHeader, path: Path, size: int, calling_aet: str) -> None:
        entry = _Pending(header, path, size, calling_aet)
        with self._cond:
            self._queue.append(entry)
            while not entry.done and self._leading:
                self._cond.wait()
            if not entry.done:
                self._leading = True
                batch, self._queue = self._queue, []
        if not entry.done:
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if entry.error is not None:
            raise entry.error

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            self._transaction(batch)
        except SQLAlchemyError as exc:
            if len(batch) == 1 or isinstance(exc, OperationalError):
                error = _database_error(exc)
                for entry in batch:
                    entry.error = error
            else:  # one bad row must not fail its neighbours: retry them one by one
                for entry in batch:
                    try:
                        self._transaction([entry])
                    except SQLAlchemyError as single:
                        entry.error = _database_error(single)
        for entry in batch:
            entry.done = True

    def _transaction(self, batch: list[_Pending]) -> None:
        now = utcnow()
        engine: Engine = self.sessions.kw["bind"]
        with engine.begin() as connection:  # Core on a bare connection: no ORM session cost
            for entry in batch:
                record_instance(
                    connection, entry.header, entry.path, entry.size, entry.calling_aet, now
                )


def _database_error(exc: SQLAlchemyError) -> DatabaseUnavailableError:
    reason = getattr(exc, "orig", None) or exc
    return DatabaseUnavailableError(f"database unavailable: {reason}")


class _Refused:
    """An incoming dataset refused before its bytes arrive: they are read and dropped."""

    def __init__(self, status: StoreStatus, comment: str) -> None:
        self.status = status
        self.comment = comment

    def write(self, data: memoryview) -> None:
        pass

    def finish(self) -> tuple[int, str]:
        return int(self.status), self.comment

    def discard(self) -> None:
        pass


def part10_prefix(request: StoreRequest) -> bytes:
    """Preamble, ``DICM`` and the file meta group (PS3.10 7.1) for a received dataset.

    Encoded by hand: building it through pydicom cost more than the fsync per instance.
    """

    def element(elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
        if len(value) % 2:
            value += pad
        if vr == b"OB":
            return struct.pack("<HH2s2xI", 0x0002, elem, vr, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value

    body = b"".join(
        (
            element(0x0001, b"OB", b"\x00\x01", b""),
            element(0x0002, b"UI", request.sop_class_uid.encode(), b"\x00"),
            element(0x0003, b"UI", request.sop_instance_uid.encode(), b"\x00"),
            element(0x0010, b"UI", request.transfer_syntax_uid.encode(), b"\x00"),
            element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode(), b"\x00"),
            element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode(), b" "),
            element(0x0016, b"AE", request.calling_aet.encode("ascii", "replace"), b" ")
            if request.calling_aet
            else b"",
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


class _IncomingInstance:
    """One C-STORE dataset on its way into the spool."""

    def __init__(self, handler: StoreHandler, request: StoreRequest) -> None:
        self.handler = handler
        self.request = request
        self.file = IncomingFile(handler.spool_dir)
        self.error: SpoolError | None = None
        self.file.write(part10_prefix(request))
        self.dataset_offset = self.file.size

    def write(self, data: memoryview) -> None:
        if self.error is None:
            try:
                self.file.write(data)
            except SpoolError as exc:  # disk full mid-dataset: drop the rest, answer at the end
                self.error = exc

    def discard(self) -> None:
        self.file.discard()

    def finish(self) -> tuple[int, str]:
        try:
            if self.error is not None:
                raise self.error
            header = self._store()
        except PacsnodeError as exc:
            self.file.discard()
            status = store_status_for(exc)
            log.warning(
                "C-STORE from %s refused with 0x%04X: %s", self.request.calling_aet, status, exc
            )
            return int(status), str(exc)
        self.handler.metrics.instance_stored(
            self.request.calling_aet, header.modality, self.file.size - self.dataset_offset
        )
        self.handler.on_stored(header)
        return int(StoreStatus.SUCCESS), ""

    def _store(self) -> InstanceHeader:
        request = self.request
        self.file.sync()
        values = header_values(self.file.path, self.dataset_offset, request.transfer_syntax_uid)
        header = read_header(
            values, request.transfer_syntax_uid, request.sop_class_uid, request.sop_instance_uid
        )
        final = spool_path(
            self.handler.spool_dir, header.study_uid, header.series_uid, header.sop_instance_uid
        )
        first_copy = not final.exists()
        self.file.publish(final)
        try:
            self.handler.recorder.record(header, final, self.file.size, request.calling_aet)
        except PacsnodeError:
            if first_copy:  # refused: leave no file without a row (a resend's row keeps its file)
                with contextlib.suppress(OSError):
                    final.unlink()
            raise
        return header


class StoreHandler:
    """Turns C-STORE requests into spool files and rows; dependencies come in, no globals."""

    def __init__(
        self,
        spool_dir: Path,
        sessions: sessionmaker[Session],
        on_stored: Callable[[InstanceHeader], None] = lambda header: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.spool_dir = spool_dir
        self.recorder = Recorder(sessions)
        self.on_stored = on_stored
        self.metrics = metrics or Metrics()

    def begin(self, request: StoreRequest) -> _IncomingInstance | _Refused:
        if not is_valid_uid(request.sop_class_uid):
            return _Refused(StoreStatus.CANNOT_UNDERSTAND, "invalid Affected SOP Class UID")
        if not is_valid_uid(request.sop_instance_uid):
            return _Refused(
                StoreStatus.MISSING_OR_INVALID_ATTRIBUTE, "invalid Affected SOP Instance UID"
            )
        try:
            return _IncomingInstance(self, request)
        except PacsnodeError as exc:
            log.warning("C-STORE from %s refused: %s", request.calling_aet, exc)
            return _Refused(store_status_for(exc), str(exc))


def acceptor_policy(config: Config) -> AcceptorPolicy:
    """Our AE title, presentation contexts, access rules, TLS and limits, from the config."""
    node = config.node
    tls = node.tls
    ssl_context = None
    if tls.enabled:
        assert tls.certificate is not None and tls.private_key is not None  # config checks it
        try:
            ssl_context = server_ssl_context(
                tls.certificate, tls.private_key, tls.client_ca, tls.min_version
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"node.tls: cannot load certificate, key or client_ca: {exc}"
            ) from exc
    return AcceptorPolicy.with_contexts(
        STORAGE_SOP_CLASSES,
        TRANSFER_SYNTAXES,
        ae_title=node.ae_title,
        allowed_calling_aets=tuple(node.allowed_calling_aets),
        allow=tuple(AccessRule(rule.ae_title, rule.address) for rule in node.allow),
        max_pdu_size=node.max_pdu_size,
        max_associations=node.max_associations,
        acse_timeout=node.acse_timeout,
        dimse_timeout=node.dimse_timeout,
        network_timeout=node.network_timeout,
        max_instances=node.max_association_instances,
        max_bytes=node.max_association_bytes,
        ssl_context=ssl_context,
    )


def _private_dir(path: Path) -> None:
    """Create ``path`` readable by the node's user only (0700, whatever the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if path.is_dir() and path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users; it holds patient data", path)
        return
    os.chmod(path, 0o700)


class Receiver:
    """The SCP as a component of the node: ``initialize`` binds the port, ``shutdown`` closes it."""

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        on_stored: Callable[[InstanceHeader], None] = lambda header: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.handler = StoreHandler(config.storage.spool_dir, sessions, on_stored, metrics)
        self.audit = eventlog.AssociationAudit(sessions.kw["bind"])
        self.server: StoreServer | None = None

    def initialize(self) -> None:
        spool = self.config.storage.spool_dir
        _private_dir(spool)
        removed = sweep_temp_files(spool)
        if removed:
            log.warning("removed %d partial files left in %s by an earlier crash", removed, spool)
        policy = acceptor_policy(self.config)
        self.audit.initialize()
        observer = self.handler.metrics.observe_associations(self.audit)
        server = StoreServer(policy, self.handler, observer)
        server.start(self.config.node.host, self.config.node.port)
        self.server = server
        log.info(
            "receiver %s listening on %s:%d",
            self.config.node.ae_title,
            self.config.node.host,
            server.port,
        )

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.audit.shutdown()
