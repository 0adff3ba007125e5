"""The receiver's DICOM upper layer: associations, PDU framing and DIMSE commands.

pynetdicom's association machinery (two threads and three queues per association,
1 ms polling sleeps, 4 KiB socket reads) costs about four times dcmtk's storescp on a
CT series, before any of our own work. This layer keeps pynetdicom's A-ASSOCIATE
codecs and presentation-context negotiation, and replaces the rest with one blocking
thread per association that reads the socket in large blocks and streams each
dataset fragment straight into the spool file as it arrives. Storing an instance then
costs its fsync, rename and database commit, and little else.

The layer knows nothing about storage: it hands C-STORE requests to a
:class:`StoreSink` and answers with the status the sink returns.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from io import BufferedReader
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
ABORT_UNEXPECTED_PDU = 0x02
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_INVALID_PARAMETER = 0x06


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol; the association is aborted."""

    def __init__(self, message: str, reason: int = ABORT_UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The connection ended (EOF, reset or timeout)."""


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


@dataclass
class AcceptorPolicy:
    """Who may associate and what we accept; built from the node config."""

    ae_title: str
    allowed_calling_aets: tuple[str, ...] = ()
    max_pdu_size: int = 0
    max_associations: int = 16
    acse_timeout: float = 30.0
    network_timeout: float = 60.0
    contexts: list[PresentationContext] = field(default_factory=list)

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
    """Listens for associations; one thread serves each."""

    def __init__(self, policy: AcceptorPolicy, sink: StoreSink) -> None:
        self.policy = policy
        self.sink = sink
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._active: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    def start(self, host: str, port: int) -> None:
        listener = socket.create_server((host, port), backlog=64, reuse_port=False)
        listener.settimeout(0.25)
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="pacsnode-accept", daemon=True
        )
        self._accept_thread.start()

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
            conn.settimeout(self.policy.acse_timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._active.add(conn)
                over_limit = len(self._active) > self.policy.max_associations
            thread = threading.Thread(
                target=self._serve,
                args=(conn, f"{address[0]}:{address[1]}", over_limit),
                name=f"pacsnode-assoc-{address[1]}",
                daemon=True,
            )
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket, peer: str, over_limit: bool) -> None:
        try:
            Association(conn, peer, self.policy, self.sink, over_limit).run()
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._active.discard(conn)
                self._threads.discard(threading.current_thread())

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, abort open associations, wait for their threads."""
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            active = list(self._active)
            threads = list(self._threads)
        for conn in active:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout)


class Association:
    """One association, acceptor side: negotiate, then serve DIMSE requests until release."""

    def __init__(
        self,
        conn: socket.socket,
        peer: str,
        policy: AcceptorPolicy,
        sink: StoreSink,
        over_limit: bool = False,
    ) -> None:
        self.conn = conn
        self.peer = peer
        self.policy = policy
        self.sink = sink
        self.over_limit = over_limit
        self.stream = cast(BufferedReader, conn.makefile("rb", buffering=1 << 18))
        self.calling_aet = ""
        self.contexts: dict[int, PresentationContext] = {}
        self.buffer = bytearray(_CHUNK)
        # the DIMSE message being received
        self.command = bytearray()
        self.command_context = 0
        self.pending: tuple[int, Command, Incoming | None] | None = None

    def run(self) -> None:
        try:
            if not self.negotiate():
                return
            self.conn.settimeout(self.policy.network_timeout)
            self.serve()
        except ProtocolError as exc:
            log.warning("association from %s %s aborted: %s", self.calling_aet, self.peer, exc)
            with contextlib.suppress(OSError):
                self.conn.sendall(abort_pdu(exc.reason))
        except (PeerClosed, OSError) as exc:
            log.info("association from %s %s ended: %s", self.calling_aet, self.peer, exc)
        except Exception:  # an association thread's main loop: abort it, keep the node serving
            log.exception("association from %s %s failed; aborting it", self.calling_aet, self.peer)
            with contextlib.suppress(OSError):
                self.conn.sendall(abort_pdu(0))
        finally:
            self._drop_pending()
            with contextlib.suppress(OSError):
                self.stream.close()

    def _drop_pending(self) -> None:
        if self.pending is not None and self.pending[2] is not None:
            self.pending[2].discard()
        self.pending = None

    # -- association establishment ------------------------------------------------------

    def _read_pdu_header(self) -> tuple[int, int]:
        pdu_type, length = _PDU_HEADER.unpack(_read_exact(self.stream, 6))
        return pdu_type, length

    def negotiate(self) -> bool:
        pdu_type, length = self._read_pdu_header()
        if pdu_type != 0x01:
            reason = ABORT_UNEXPECTED_PDU if 0x02 <= pdu_type <= 0x07 else ABORT_UNRECOGNIZED_PDU
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}", reason)
        if length > _MAX_ASSOCIATE_RQ:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes", ABORT_INVALID_PARAMETER)
        raw = _PDU_HEADER.pack(pdu_type, length) + _read_exact(self.stream, length)
        try:
            request_pdu = A_ASSOCIATE_RQ()
            request_pdu.decode(raw)
            request = request_pdu.to_primitive()
        except Exception as exc:  # a foreign codec on hostile bytes: any failure is a bad PDU
            raise ProtocolError(
                f"undecodable A-ASSOCIATE-RQ: {exc}", ABORT_INVALID_PARAMETER
            ) from exc
        self.calling_aet = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        reject = self._reject_reason(struct.unpack_from(">H", raw, 6)[0], request, called)
        if reject is not None:
            log.warning(
                "association from %s %s to %s rejected %s",
                self.calling_aet,
                self.peer,
                called,
                reject,
            )
            rejection = pdu_primitives.A_ASSOCIATE()
            rejection.result, rejection.result_source, rejection.diagnostic = reject
            rj = A_ASSOCIATE_RJ()
            rj.from_primitive(rejection)
            self.conn.sendall(rj.encode())
            return False
        self.conn.sendall(self._accept(request))
        log.info(
            "association from %s %s accepted: %d of %d contexts",
            self.calling_aet,
            self.peer,
            len(self.contexts),
            len(request.presentation_context_definition_list),
        )
        return True

    def _reject_reason(
        self, protocol_version: int, request: pdu_primitives.A_ASSOCIATE, called: str
    ) -> tuple[int, int, int] | None:
        policy = self.policy
        if not protocol_version & 0x0001:
            return REJECT_PROTOCOL_VERSION
        if str(request.application_context_name) != APPLICATION_CONTEXT:
            return REJECT_APPLICATION_CONTEXT
        if called != policy.ae_title.strip():
            return REJECT_CALLED_AET
        if policy.allowed_calling_aets and self.calling_aet not in policy.allowed_calling_aets:
            return REJECT_CALLING_AET
        if self.over_limit:
            return REJECT_LOCAL_LIMIT
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
        while True:
            pdu_type, length = self._read_pdu_header()
            if pdu_type == 0x04:
                self._p_data(length)
            elif pdu_type == 0x05:
                _read_exact(self.stream, length)
                if self.pending is not None:
                    raise ProtocolError("A-RELEASE-RQ in the middle of a message")
                self.conn.sendall(RELEASE_RP)
                log.info("association from %s %s released", self.calling_aet, self.peer)
                return
            elif pdu_type == 0x07:
                raise PeerClosed("peer aborted the association")
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
        else:
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
        view = memoryview(self.buffer)
        while size > 0:
            chunk = min(size, _CHUNK)
            got = self.stream.readinto(view[:chunk])
            if not got:
                raise PeerClosed("connection closed mid-dataset")
            if incoming is not None:
                incoming.write(view[:got])
            size -= got
        if not last:
            return
        self.pending = None
        if incoming is None:
            self._respond(context_id, command.field | 0x8000, command, UNRECOGNIZED)
            return
        status, comment = incoming.finish()
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
