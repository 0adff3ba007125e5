"""Raw upper-layer PDUs for the tests that talk to the node over a bare socket."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from pynetdicom import pdu_primitives
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.presentation import build_context

from pacsnode.upperlayer import APPLICATION_CONTEXT, VERIFICATION


def associate_rq(
    called: str,
    calling: str = "RAWSCU",
    contexts: Sequence[tuple[int, str]] = ((1, VERIFICATION),),
    transfer_syntaxes: Sequence[str] | None = None,
) -> bytes:
    """An encoded A-ASSOCIATE-RQ proposing ``contexts`` (context id, abstract syntax)."""
    primitive = pdu_primitives.A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    proposed = []
    for context_id, uid in contexts:
        context = build_context(uid, list(transfer_syntaxes) if transfer_syntaxes else None)
        context.context_id = context_id
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    max_length = pdu_primitives.MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = pdu_primitives.ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU, or b"" when the node closes the connection first."""
    data = b""
    while len(data) < 6 or len(data) < 6 + int.from_bytes(data[2:6], "big"):
        chunk = sock.recv(65536)
        if not chunk:
            return b""
        data += chunk
    return data
