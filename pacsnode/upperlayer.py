"""The receiver's DICOM upper layer: associations, PDU framing and DIMSE commands.

pynetdicom's association machinery (two threads and three queues per association,
1 ms polling sleeps, 4 KiB socket reads) costs about four times dcmtk's storescp on a
CT series, before any of our own work. This layer keeps pynetdicom's A-ASSOCIATE
codecs and presentation-context negotiation, and replaces the rest with one blocking
thread per association that reads the socket in large blocks and streams each
dataset fragment straight into the spool file as it arrives. Storing an instance then
costs its fsync, rename and database commit, and little else.

The layer knows nothing about storage: it hands C-STORE requests to a
:class:`StoreSink` and answers with the status the sink returns, and it reports each
association's opening and end to an :class:`AssociationObserver` (the audit trail).

It is also the node's front door, so it enforces the access rules (calling AE title and
source address), DICOM TLS, and the limits that keep a hostile or broken peer from
exhausting the node: concurrent associations, PDU size, per-association byte and
instance caps, and deadlines. Deadlines are total, not per read, so a peer that
trickles one byte at a time cannot hold a thread forever: one watchdog thread per
server shuts down the read side of any connection past its deadline.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BufferedReader
from pathlib import Path
from typing import Protocol, cast

from pydicom.uid import UID
from pynetdicom import pdu_primitives
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from pacsnode.uids import derive_uid

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = derive_uid("pacsnode", "implementation", "1")
IMPLEMENTATION_VERSION = "PACSNODE_1"
VERIFICATION = "1.2.840.10008.1.1"

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101
UNRECOGNIZED = 0x0211  # unrecognized operation

_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_MAX_ASSOCIATE_RQ = 1 << 20
_MAX_COMMAND = 1 << 16
_CHUNK = 1 << 20

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AET = (0x01, 0x01, 0x03)
REJECT_CALLED_AET = (0x01, 0x01, 0x07)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

# A-ABORT provider reasons, PS3.8 9.3.8
ABORT_REASON_NOT_SPECIFIED = 0x00
ABORT_UNEXPECTED_PDU = 0x02
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_INVALID_PARAMETER = 0x06

OUT_OF_RESOURCES = 0xA700  # C-STORE refused: over the association's instance cap

_WATCHDOG_TICK = 0.1  # seconds; the resolution of every deadline


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol; the association is aborted."""

    def __init__(self, message: str, reason: int = ABORT_UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The connection ended (EOF, reset or timeout)."""


_PEER_ABORTED = "peer aborted the association"
_THREAD_PREFIX = "pacsnode-assoc-"


def printable(text: str) -> str:
    """``text`` with anything outside printable ASCII replaced by ``?``: a peer's AE title
    goes into logs and the audit, and must not forge lines or smuggle control bytes."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _codec_loggers() -> list[logging.Logger]:
    """pynetdicom's and pydicom's loggers (a filter acts only on the logger it is on)."""
    names = [
        name
        for name in logging.Logger.manager.loggerDict
        if name.split(".")[0] in ("pynetdicom", "pydicom")
    ]
    return [logging.getLogger(name) for name in {"pynetdicom", "pydicom", *names}]


class _QuietCodecs(logging.Filter):
    """Drops what pynetdicom and pydicom log on association threads.

    There they only decode what a peer sent, and on hostile bytes they log a traceback or
    a warning per malformed field (a log flood a peer controls); the association logs
    one line with the reason instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not threading.current_thread().name.startswith(_THREAD_PREFIX):
            return True
        return record.name.startswith("pydicom") and record.levelno >= logging.ERROR


def _subject(certificate: object) -> str:
    """``CN=...`` of a verified peer certificate, for the audit; "" without one."""
    if not isinstance(certificate, dict):
        return ""
    parts = [
        f"{key}={value}"
        for rdn in certificate.get("subject", ())
        for key, value in rdn
        if key in ("commonName", "organizationName")
    ]
    return ", ".join(parts)[:128]


@dataclass(frozen=True)
class StoreRequest:
    """What a C-STORE-RQ announces, plus who sent it."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_aet: str
    peer_address: str


@dataclass(frozen=True)
class Command:
    """The fields of a DIMSE request command set that we act on."""

    field: int
    message_id: int
    has_dataset: bool
    sop_class_uid: str
    sop_instance_uid: str


class Incoming(Protocol):
    """One dataset being received: fragments are written as they arrive."""

    def write(self, data: memoryview) -> None: ...

    def finish(self) -> tuple[int, str]:
        """All fragments are in: make it durable and return (status, error comment)."""
        ...

    def discard(self) -> None: ...


class StoreSink(Protocol):
    def begin(self, request: StoreRequest) -> Incoming: ...


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class AssociationRecord:
    """One association as the audit trail sees it; counts are kept here, in memory.

    ``result`` is the decision at association time: ``accepted``, ``rejected`` (an
    A-ASSOCIATE-RJ was sent) or ``failed`` (no decision: TLS handshake, a bad or missing
    A-ASSOCIATE-RQ, ACSE timeout). ``outcome`` is how it ended: ``released``,
    ``aborted`` (by us, ``reason`` says why), ``peer-aborted``, ``closed`` (the
    connection dropped) or ``rejected``/``failed`` again.
    """

    peer_address: str
    peer_port: int
    tls: bool
    started_at: datetime = field(default_factory=_utcnow)
    calling_aet: str = ""
    called_aet: str = ""
    tls_peer: str = ""
    result: str = "failed"
    outcome: str = ""
    reason: str = ""
    instances: int = 0
    refused: int = 0
    bytes: int = 0
    ended_at: datetime | None = None
    row_id: int | None = None  # set by the observer once the row exists


class AssociationObserver(Protocol):
    """Told when an association is accepted and when any connection ends.

    ``opened`` runs once for an accepted association, after the A-ASSOCIATE-AC went out;
    ``closed`` runs once for every connection, accepted or not. Neither may raise or
    take long: they run on the association's thread.
    """

    def opened(self, record: AssociationRecord) -> None: ...

    def closed(self, record: AssociationRecord) -> None: ...


class _NoObserver:
    def opened(self, record: AssociationRecord) -> None:
        pass

    def closed(self, record: AssociationRecord) -> None:
        pass


@dataclass(frozen=True)
class AccessRule:
    """A peer matches when its calling AE title and its address fit (None: any)."""

    ae_title: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    def matches(self, calling_aet: str, address: str) -> bool:
        if self.ae_title is not None and self.ae_title.strip() != calling_aet:
            return False
        if self.network is None:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.version == self.network.version and ip in self.network


def server_ssl_context(
    certificate: Path,
    private_key: Path,
    client_ca: Path | None = None,
    min_version: str = "TLSv1.2",
) -> ssl.SSLContext:
    """A TLS server context: our certificate, and with ``client_ca`` mutual TLS.

    Built from ``PROTOCOL_TLS_SERVER`` rather than ``create_default_context`` so that the
    system CA store is never trusted to vouch for a client.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion[min_version.replace(".", "_")]
    context.load_cert_chain(certificate, private_key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


@dataclass
class AcceptorPolicy:
    """Who may associate and what we accept; built from the node config.

    With neither ``allowed_calling_aets`` nor ``allow`` set, anyone may associate;
    otherwise a peer must match a rule or have a listed calling AE title. The caps
    are 0 for "no cap".
    """

    ae_title: str
    allowed_calling_aets: tuple[str, ...] = ()
    allow: tuple[AccessRule, ...] = ()
    max_pdu_size: int = 0
    max_associations: int = 16
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 60.0
    max_instances: int = 0
    max_bytes: int = 0
    ssl_context: ssl.SSLContext | None = None
    contexts: list[PresentationContext] = field(default_factory=list)

    def access_denied(self, calling_aet: str, address: str) -> str | None:
        """Why this (calling AE title, address) may not associate, or None when it may."""
        if not self.allow and not self.allowed_calling_aets:
            return None
        if calling_aet in self.allowed_calling_aets:
            return None
        if any(rule.matches(calling_aet, address) for rule in self.allow):
            return None
        known = calling_aet in self.allowed_calling_aets or any(
            rule.ae_title is not None and rule.ae_title.strip() == calling_aet
            for rule in self.allow
        )
        if known:
            return f"calling AE title {calling_aet!r} is not allowed from {address}"
        return f"calling AE title {calling_aet!r} is not allowed"

    @classmethod
    def with_contexts(
        cls, sop_classes: Iterable[str], transfer_syntaxes: Sequence[str], **kwargs: object
    ) -> AcceptorPolicy:
        contexts = [build_context(VERIFICATION, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])]
        contexts += [build_context(uid, list(transfer_syntaxes)) for uid in sop_classes]
        return cls(contexts=contexts, **kwargs)  # type: ignore[arg-type]


def _read_exact(stream: BufferedReader, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) < size:
        raise PeerClosed("connection closed mid-PDU")
    return data


_COMMAND_ELEMENT = struct.Struct("<HHI")


def parse_command(raw: bytes) -> Command:
    """Decode a request command set (always implicit VR little endian, PS3.7 6.3.1)."""
    values: dict[int, bytes] = {}
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < 8:
            raise ProtocolError("command set ends inside an element", ABORT_INVALID_PARAMETER)
        group, elem, length = _COMMAND_ELEMENT.unpack_from(raw, pos)
        pos += 8
        if group != 0x0000 or length > len(raw) - pos:
            raise ProtocolError(
                f"command element ({group:04X},{elem:04X}) is malformed", ABORT_INVALID_PARAMETER
            )
        values[elem] = raw[pos : pos + length]
        pos += length

    def ushort(elem: int, default: int) -> int:
        value = values.get(elem)
        if value is None:
            return default
        if len(value) != 2:
            raise ProtocolError(f"command element (0000,{elem:04X}) is not US")
        return int(struct.unpack("<H", value)[0])

    def text(elem: int) -> str:
        return values.get(elem, b"").decode("ascii", "replace").strip("\x00 ")

    if 0x0100 not in values:
        raise ProtocolError("command set without Command Field", ABORT_INVALID_PARAMETER)
    return Command(
        field=ushort(0x0100, 0),
        message_id=ushort(0x0110, 0),
        has_dataset=ushort(0x0800, NO_DATASET) != NO_DATASET,
        sop_class_uid=text(0x0002),
        sop_instance_uid=text(0x1000),
    )


def encode_command(
    command_field: int,
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str | None,
    status: int,
    comment: str = "",
) -> bytes:
    """A DIMSE response command set (implicit VR little endian, group length first)."""

    def element(elem: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0x0000, elem, len(value)) + value

    def uid(value: str) -> bytes:
        raw = value.encode("ascii", "replace")
        return raw + b"\x00" if len(raw) % 2 else raw

    body = [element(0x0002, uid(sop_class_uid))]
    body.append(element(0x0100, struct.pack("<H", command_field)))
    body.append(element(0x0120, struct.pack("<H", message_id)))
    body.append(element(0x0800, struct.pack("<H", NO_DATASET)))
    body.append(element(0x0900, struct.pack("<H", status)))
    if comment:
        text = comment[:64].encode("ascii", "replace")
        body.append(element(0x0902, text + b" " if len(text) % 2 else text))
    if sop_instance_uid:
        body.append(element(0x1000, uid(sop_instance_uid)))
    payload = b"".join(body)
    return element(0x0000, struct.pack("<I", len(payload))) + payload


def p_data_command(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU carrying a whole command set in a single last fragment."""
    pdv = _PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command
    return _PDU_HEADER.pack(0x04, len(pdv)) + pdv


def abort_pdu(reason: int = 0) -> bytes:
    return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, reason])


RELEASE_RP = bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])


class StoreServer:
    """Listens for associations; one thread serves each, one watchdog enforces deadlines.

    The accept thread only accepts: the TLS handshake and everything after it run on the
    association's own thread, so a peer that stalls its handshake delays no one else.
    Connections beyond twice ``max_associations`` (half of them still negotiating) are
    closed at once, without a thread.
    """

    def __init__(
        self,
        policy: AcceptorPolicy,
        sink: StoreSink,
        observer: AssociationObserver | None = None,
    ) -> None:
        self.policy = policy
        self.sink = sink
        self.observer: AssociationObserver = observer or _NoObserver()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._active: set[Association] = set()
        self._threads: set[threading.Thread] = set()
        self._quiet = _QuietCodecs()

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    def start(self, host: str, port: int) -> None:
        listener = socket.create_server((host, port), backlog=64, reuse_port=False)
        for codec_log in _codec_loggers():
            codec_log.addFilter(self._quiet)
        listener.settimeout(0.25)
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="pacsnode-accept", daemon=True
        )
        self._accept_thread.start()
        self._watchdog = threading.Thread(
            target=self._watch_deadlines, name="pacsnode-watchdog", daemon=True
        )
        self._watchdog.start()

    def _watch_deadlines(self) -> None:
        while not self._stop.wait(_WATCHDOG_TICK):
            now = time.monotonic()
            with self._lock:  # under the lock: a listed association's socket is still open
                for association in self._active:
                    association.check_deadline(now)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.error("accept failed (%s); retrying", exc)  # e.g. EMFILE under load
                self._stop.wait(0.1)
                continue
            with self._lock:
                count = len(self._active)
            if count >= 2 * self.policy.max_associations:
                log.warning(
                    "connection from %s:%s closed: %d connections open already",
                    address[0],
                    address[1],
                    count,
                )
                with contextlib.suppress(OSError):
                    conn.close()
                continue
            conn.settimeout(self.policy.acse_timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            association = Association(
                conn,
                (str(address[0]), int(address[1])),
                self.policy,
                self.sink,
                count >= self.policy.max_associations,
                self.observer,
            )
            thread = threading.Thread(
                target=self._serve,
                args=(association,),
                name=f"{_THREAD_PREFIX}{address[1]}",
                daemon=True,
            )
            with self._lock:
                self._active.add(association)
                self._threads.add(thread)
            thread.start()

    def _serve(self, association: Association) -> None:
        try:
            association.run()
        finally:
            with self._lock:  # off the watchdog's list before its descriptor is closed
                self._active.discard(association)
            with contextlib.suppress(OSError):
                association.conn.close()
            association.report()  # after the close: the peer never waits for the audit
            with self._lock:
                self._threads.discard(threading.current_thread())

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, abort open associations, wait for their threads."""
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._listener is not None:
            self._listener.close()
        if self._watchdog is not None:
            self._watchdog.join(timeout)
        with self._lock:
            for association in self._active:
                association.expire("node shutting down")
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        for codec_log in _codec_loggers():
            codec_log.removeFilter(self._quiet)


class _Refusal:
    """A dataset refused by the layer itself (instance cap): its bytes are read and dropped."""

    def __init__(self, status: int, comment: str) -> None:
        self.status = status
        self.comment = comment

    def write(self, data: memoryview) -> None:
        pass

    def finish(self) -> tuple[int, str]:
        return self.status, self.comment

    def discard(self) -> None:
        pass


class Association:
    """One association, acceptor side: TLS, negotiate, then serve DIMSE requests until release."""

    def __init__(
        self,
        conn: socket.socket,
        address: tuple[str, int],
        policy: AcceptorPolicy,
        sink: StoreSink,
        over_limit: bool = False,
        observer: AssociationObserver | None = None,
    ) -> None:
        self.conn = conn
        self.fileno = conn.fileno()  # survives wrapping in TLS; the watchdog shuts it down
        self.address = address[0]
        self.peer = f"{address[0]}:{address[1]}"
        self.policy = policy
        self.sink = sink
        self.over_limit = over_limit
        self.observer: AssociationObserver = observer or _NoObserver()
        self.record = AssociationRecord(
            peer_address=address[0], peer_port=address[1], tls=policy.ssl_context is not None
        )
        self.stream: BufferedReader | None = None
        self.calling_aet = ""
        self.aet_printable = True
        self.contexts: dict[int, PresentationContext] = {}
        self.buffer = bytearray(_CHUNK)
        self.store_requests = 0
        # the DIMSE message being received
        self.command = bytearray()
        self.command_context = 0
        self.pending: tuple[int, Command, Incoming | None] | None = None
        # a monotonic deadline for the current phase; the server's watchdog enforces it
        self.deadline: float | None = time.monotonic() + policy.acse_timeout
        self.deadline_reason = f"ACSE timeout ({policy.acse_timeout:g} s)"
        self.expired: str | None = None

    def check_deadline(self, now: float) -> None:
        deadline = self.deadline
        if deadline is not None and now > deadline:
            self.expire(self.deadline_reason)

    def expire(self, reason: str) -> None:
        """Stop the association from another thread: its blocked read sees end of stream.

        Only the read side is shut, so the association can still send its A-ABORT.
        Repeated every watchdog tick until the association's thread ends.
        """
        self.expired = self.expired or reason
        probe = socket.socket(fileno=self.fileno)
        try:
            with contextlib.suppress(OSError):
                probe.shutdown(socket.SHUT_RD)
        finally:
            probe.detach()

    def run(self) -> None:
        record = self.record
        try:
            self._start_tls()
            self.stream = cast(BufferedReader, self.conn.makefile("rb", buffering=1 << 18))
            if not self.negotiate():
                return
            self.conn.settimeout(self.policy.network_timeout)
            self.serve()
            record.outcome = "released"
        except ProtocolError as exc:
            self._abort(str(exc), exc.reason)
        except (PeerClosed, OSError) as exc:
            if self.expired is not None:
                self._abort(self.expired, ABORT_REASON_NOT_SPECIFIED)
            elif isinstance(exc, TimeoutError) and record.result == "accepted":
                timeout = self.policy.network_timeout
                self._abort(f"network timeout ({timeout:g} s)", ABORT_REASON_NOT_SPECIFIED)
            elif isinstance(exc, PeerClosed) and str(exc) == _PEER_ABORTED:
                record.outcome, record.reason = "peer-aborted", str(exc)
                log.info("association from %s %s ended: %s", self.calling_aet, self.peer, exc)
            else:
                record.outcome = record.outcome or "closed"
                record.reason = record.reason or str(exc)
                log.info("association from %s %s ended: %s", self.calling_aet, self.peer, exc)
        except Exception as exc:  # the thread's main loop: abort it, keep the node serving
            log.exception("association from %s %s failed; aborting it", self.calling_aet, self.peer)
            self._abort(f"internal error: {type(exc).__name__}", ABORT_REASON_NOT_SPECIFIED)
        finally:
            self._drop_pending()
            if self.stream is not None:
                with contextlib.suppress(OSError):
                    self.stream.close()
            record.ended_at = _utcnow()
            record.outcome = record.outcome or "closed"

    def report(self) -> None:
        """Hand the finished record to the observer (once the connection is closed)."""
        try:
            self.observer.closed(self.record)
        except Exception:  # the audit must never take the receiver down
            log.exception("recording the end of association from %s failed", self.peer)

    def _abort(self, reason: str, pdu_reason: int) -> None:
        log.warning("association from %s %s aborted: %s", self.calling_aet, self.peer, reason)
        self.record.outcome, self.record.reason = "aborted", reason
        with contextlib.suppress(OSError, ValueError):
            self.conn.sendall(abort_pdu(pdu_reason))

    def _start_tls(self) -> None:
        """The TLS handshake, on this thread, within the ACSE deadline."""
        context = self.policy.ssl_context
        if context is None:
            return
        try:
            tls = context.wrap_socket(self.conn, server_side=True, do_handshake_on_connect=False)
            self.conn = tls
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            reason = self.expired or f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}"
            log.warning("connection from %s refused: %s", self.peer, reason)
            self.record.outcome, self.record.reason = "failed", reason
            raise PeerClosed(reason) from exc
        self.record.tls_peer = _subject(tls.getpeercert())

    def _drop_pending(self) -> None:
        if self.pending is not None and self.pending[2] is not None:
            self.pending[2].discard()
        self.pending = None

    # -- association establishment ------------------------------------------------------

    def _read_pdu_header(self) -> tuple[int, int]:
        assert self.stream is not None
        pdu_type, length = _PDU_HEADER.unpack(_read_exact(self.stream, 6))
        return pdu_type, length

    def negotiate(self) -> bool:
        assert self.stream is not None
        pdu_type, length = self._read_pdu_header()
        if pdu_type != 0x01:
            reason = ABORT_UNEXPECTED_PDU if 0x02 <= pdu_type <= 0x07 else ABORT_UNRECOGNIZED_PDU
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}", reason)
        if length > _MAX_ASSOCIATE_RQ or length < 68:  # 68: the fixed fields alone
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes", ABORT_INVALID_PARAMETER)
        raw = _PDU_HEADER.pack(pdu_type, length) + _read_exact(self.stream, length)
        try:
            request_pdu = A_ASSOCIATE_RQ()
            request_pdu.decode(raw)
            request = request_pdu.to_primitive()
            raw_calling = str(request.calling_ae_title).strip()
            called = printable(str(request.called_ae_title).strip())
            self.calling_aet = printable(raw_calling)
            self.aet_printable = self.calling_aet == raw_calling
        except Exception as exc:  # a foreign codec on hostile bytes: any failure is a bad PDU
            raise ProtocolError(
                f"undecodable A-ASSOCIATE-RQ: {exc}", ABORT_INVALID_PARAMETER
            ) from exc
        record = self.record
        record.calling_aet, record.called_aet = self.calling_aet[:16], called[:16]
        reject = self._reject_reason(struct.unpack_from(">H", raw, 6)[0], request, called)
        if reject is not None:
            diagnosis, why = reject
            log.warning(
                "association from %s %s to %s rejected %s: %s",
                self.calling_aet,
                self.peer,
                called,
                diagnosis,
                why,
            )
            record.result = record.outcome = "rejected"
            record.reason = why
            rejection = pdu_primitives.A_ASSOCIATE()
            rejection.result, rejection.result_source, rejection.diagnostic = diagnosis
            rj = A_ASSOCIATE_RJ()
            rj.from_primitive(rejection)
            self.conn.sendall(rj.encode())
            return False
        try:
            accept = self._accept(request)
        except Exception as exc:  # pynetdicom's negotiation on hostile contexts
            raise ProtocolError(
                f"unusable presentation contexts: {exc}", ABORT_INVALID_PARAMETER
            ) from exc
        self.conn.sendall(accept)
        self.deadline = None
        record.result = "accepted"
        log.info(
            "association from %s %s accepted%s: %d of %d contexts",
            self.calling_aet,
            self.peer,
            " over TLS" if record.tls else "",
            len(self.contexts),
            len(request.presentation_context_definition_list),
        )
        try:  # after the A-ASSOCIATE-AC: the peer is not kept waiting for the audit insert
            self.observer.opened(record)
        except Exception:
            log.exception("recording the association from %s failed", self.peer)
        return True

    def _reject_reason(
        self, protocol_version: int, request: pdu_primitives.A_ASSOCIATE, called: str
    ) -> tuple[tuple[int, int, int], str] | None:
        policy = self.policy
        if not protocol_version & 0x0001:
            return REJECT_PROTOCOL_VERSION, f"protocol version 0x{protocol_version:04X}"
        if str(request.application_context_name) != APPLICATION_CONTEXT:
            return REJECT_APPLICATION_CONTEXT, "unknown application context"
        if called != policy.ae_title.strip():
            return REJECT_CALLED_AET, f"called AE title {called!r} is not ours"
        denied = policy.access_denied(self.calling_aet, self.address)
        restricted = bool(policy.allow or policy.allowed_calling_aets)
        if denied is None and restricted and not self.aet_printable:
            denied = "calling AE title has characters outside the default repertoire"
        if denied is not None:
            return REJECT_CALLING_AET, denied
        if self.over_limit:
            return REJECT_LOCAL_LIMIT, f"{policy.max_associations} associations open already"
        return None

    def _accept(self, request: pdu_primitives.A_ASSOCIATE) -> bytes:
        roles: dict[UID, tuple[bool | None, bool | None]] = {}
        for item in request.user_information:
            if (
                isinstance(item, pdu_primitives.SCP_SCU_RoleSelectionNegotiation)
                and item.sop_class_uid is not None
            ):
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        results, role_items = negotiate_as_acceptor(
            request.presentation_context_definition_list, self.policy.contexts, roles
        )
        self.contexts = {
            int(cx.context_id): cx for cx in results if cx.result == 0 and cx.context_id
        }
        accept = pdu_primitives.A_ASSOCIATE()
        accept.application_context_name = UID(APPLICATION_CONTEXT)
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result = 0x00
        accept.result_source = 0x01
        accept.presentation_context_definition_results_list = results
        max_length = pdu_primitives.MaximumLengthNotification()
        max_length.maximum_length_received = self.policy.max_pdu_size
        implementation = pdu_primitives.ImplementationClassUIDNotification()
        implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = pdu_primitives.ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION
        accept.user_information = [max_length, implementation, version, *role_items]
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(accept)
        return bytes(ac.encode())

    # -- established association -----------------------------------------------------------

    def serve(self) -> None:
        assert self.stream is not None
        while True:
            pdu_type, length = self._read_pdu_header()
            if pdu_type == 0x04:
                if self.deadline is None:  # a DIMSE message starts: it must end in time
                    self.deadline_reason = f"DIMSE timeout ({self.policy.dimse_timeout:g} s)"
                    self.deadline = time.monotonic() + self.policy.dimse_timeout
                self._p_data(length)
                if self.pending is None and not self.command:
                    self.deadline = None
            elif pdu_type == 0x05:
                if length != 4:  # PS3.8 9.3.6; and never allocate what a length claims
                    raise ProtocolError(f"A-RELEASE-RQ of {length} bytes", ABORT_INVALID_PARAMETER)
                _read_exact(self.stream, length)
                if self.pending is not None or self.command:
                    raise ProtocolError("A-RELEASE-RQ in the middle of a message")
                self.conn.sendall(RELEASE_RP)
                log.info(
                    "association from %s %s released: %d instances, %d refused, %d bytes",
                    self.calling_aet,
                    self.peer,
                    self.record.instances,
                    self.record.refused,
                    self.record.bytes,
                )
                return
            elif pdu_type == 0x07:
                raise PeerClosed(_PEER_ABORTED)
            elif pdu_type in (0x01, 0x02, 0x03, 0x06):
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
            else:
                raise ProtocolError(f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)

    def _p_data(self, length: int) -> None:
        max_pdu = self.policy.max_pdu_size
        if max_pdu and length > max_pdu + 6:
            raise ProtocolError(
                f"P-DATA-TF of {length} bytes exceeds our maximum {max_pdu}",
                ABORT_INVALID_PARAMETER,
            )
        remaining = length
        while remaining > 0:
            if remaining < 6:
                raise ProtocolError("P-DATA-TF ends inside a PDV header", ABORT_INVALID_PARAMETER)
            assert self.stream is not None
            pdv_length, context_id, control = _PDV_HEADER.unpack(_read_exact(self.stream, 6))
            value_length = pdv_length - 2
            if pdv_length < 2 or pdv_length + 4 > remaining:
                raise ProtocolError(
                    f"PDV of {pdv_length} bytes overruns its P-DATA-TF", ABORT_INVALID_PARAMETER
                )
            if context_id not in self.contexts:
                raise ProtocolError(f"PDV on presentation context {context_id}, not accepted")
            remaining -= pdv_length + 4
            if control & 0x01:
                self._command_fragment(context_id, value_length, last=bool(control & 0x02))
            else:
                self._dataset_fragment(context_id, value_length, last=bool(control & 0x02))

    def _command_fragment(self, context_id: int, size: int, last: bool) -> None:
        if self.pending is not None:
            raise ProtocolError("command fragment while a dataset is expected")
        if self.command and context_id != self.command_context:
            raise ProtocolError("command fragments on two presentation contexts")
        if len(self.command) + size > _MAX_COMMAND:
            raise ProtocolError("command set larger than 64 KiB", ABORT_INVALID_PARAMETER)
        self.command_context = context_id
        assert self.stream is not None
        self.command += _read_exact(self.stream, size)
        if last:
            command, self.command = bytes(self.command), bytearray()
            self._command(context_id, command)

    def _command(self, context_id: int, raw: bytes) -> None:
        command = parse_command(raw)
        if command.field == C_ECHO_RQ and not command.has_dataset:
            self._respond(context_id, C_ECHO_RSP, command, 0x0000)
        elif command.field != C_STORE_RQ:
            if command.has_dataset:
                self.pending = (context_id, command, None)  # read and drop its dataset
            else:
                self._respond(context_id, command.field | 0x8000, command, UNRECOGNIZED)
        elif not command.has_dataset:
            self._respond(context_id, C_STORE_RSP, command, 0xC000, "C-STORE-RQ without dataset")
        elif self.policy.max_instances and self.store_requests >= self.policy.max_instances:
            self.store_requests += 1
            comment = f"over {self.policy.max_instances} instances; use a new association"
            self.pending = (context_id, command, _Refusal(OUT_OF_RESOURCES, comment))
        else:
            self.store_requests += 1
            request = StoreRequest(
                sop_class_uid=command.sop_class_uid,
                sop_instance_uid=command.sop_instance_uid,
                transfer_syntax_uid=str(self.contexts[context_id].transfer_syntax[0]),
                calling_aet=self.calling_aet,
                peer_address=self.peer,
            )
            self.pending = (context_id, command, self.sink.begin(request))

    def _dataset_fragment(self, context_id: int, size: int, last: bool) -> None:
        if self.pending is None:
            raise ProtocolError("dataset fragment without a command")
        pending_context, command, incoming = self.pending
        if context_id != pending_context:
            raise ProtocolError("dataset on another presentation context than its command")
        record = self.record
        cap = self.policy.max_bytes
        if cap and record.bytes + size > cap:
            raise ProtocolError(f"over the association's cap of {cap} bytes")
        assert self.stream is not None
        view = memoryview(self.buffer)
        while size > 0:
            chunk = min(size, _CHUNK)
            got = self.stream.readinto(view[:chunk])
            if not got:
                raise PeerClosed("connection closed mid-dataset")
            if incoming is not None:
                incoming.write(view[:got])
            size -= got
            record.bytes += got
        if not last:
            return
        self.pending = None
        if incoming is None:
            self._respond(context_id, command.field | 0x8000, command, UNRECOGNIZED)
            return
        status, comment = incoming.finish()
        if status == 0x0000 or status & 0xF000 == 0xB000:  # success or warning: it is stored
            record.instances += 1
        else:
            record.refused += 1
        self._respond(context_id, C_STORE_RSP, command, status, comment)

    def _respond(
        self, context_id: int, response_field: int, command: Command, status: int, comment: str = ""
    ) -> None:
        sop_class = command.sop_class_uid
        if not sop_class and response_field == C_ECHO_RSP:
            sop_class = VERIFICATION
        encoded = encode_command(
            response_field,
            command.message_id,
            sop_class,
            command.sop_instance_uid or None,
            status,
            comment,
        )
        self.conn.sendall(p_data_command(context_id, encoded))
