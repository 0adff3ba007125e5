"""The listener's security promises, against a real node: who may associate (calling AE
title and source address), DICOM TLS and mutual TLS with dcmtk, and the limits and
deadlines that keep a hostile peer from exhausting the node."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dicomgen import image_dataset, save
from nodeproc import NodeProcess
from peers import (
    LOOPBACK,
    combined_output,
    dcmtk_tls_args,
    echoscu,
    parse_store_statuses,
    storescu,
)
from pynetdicom import pdu_primitives
from pynetdicom.pdu import A_ASSOCIATE_AC
from rawpdu import associate_rq, read_pdu
from sqlalchemy import select
from tlscerts import Pki

from pacsnode.tables import AssociationLog

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])

LIMITS = """
max_associations = 3
max_pdu_size = 16384
acse_timeout = 1.0
dimse_timeout = 2.0
network_timeout = 2.0
max_association_instances = 3
max_association_bytes = 300000
[[node.allow]]
ae_title = "MOD1"
address = "127.0.0.0/8"
[[node.allow]]
ae_title = "REMOTE"
address = "10.0.0.0/8"
[[node.allow]]
address = "127.0.0.2"
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(
        tmp_path_factory.mktemp("secure"),
        enabled=(),
        components="receiver",
        allowed_calling_aets=["TESTSCU"],
        node_toml=LIMITS,
    ).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def _tls_node(folder: Path, pki: Pki, *, mutual: bool) -> NodeProcess:
    return NodeProcess(
        folder,
        enabled=(),
        components="receiver",
        node_toml="acse_timeout = 3.0\n" + pki.node_toml(mutual=mutual),
        probe_args=dcmtk_tls_args(pki.ca.certificate, pki.client.key, pki.client.certificate),
    ).start()


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NodeProcess]:
    proc = _tls_node(tmp_path_factory.mktemp("tls"), pki, mutual=False)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def mtls_node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NodeProcess]:
    proc = _tls_node(tmp_path_factory.mktemp("mtls"), pki, mutual=True)
    yield proc
    proc.stop()


# -- raw upper-layer helpers --------------------------------------------------------------


def connect(node: NodeProcess, source: str = LOOPBACK) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((LOOPBACK, node.port))
    return sock


def first_reply(node: NodeProcess, calling: str, source: str = LOOPBACK) -> bytes:
    """The node's answer to an A-ASSOCIATE-RQ from ``calling`` at ``source``; released if AC."""
    with connect(node, source) as sock:
        sock.sendall(associate_rq(node.ae_title, calling))
        reply = read_pdu(sock)
        if reply[:1] == b"\x02":
            sock.sendall(RELEASE_RQ)
            assert read_pdu(sock)[:1] == b"\x06"
    return reply


def rejection(reply: bytes) -> tuple[int, int, int]:
    assert reply[:1] == b"\x03", f"expected A-ASSOCIATE-RJ, got {reply[:10].hex()}"
    return reply[7], reply[8], reply[9]


def audit_rows(node: NodeProcess) -> list[AssociationLog]:
    with node.sessions()() as s:
        return list(s.scalars(select(AssociationLog).order_by(AssociationLog.id)))


def audited(node: NodeProcess, predicate: Callable[[AssociationLog], bool]) -> list[AssociationLog]:
    """The audit rows matching ``predicate``, once there is one (ends are written in batches
    a moment after the connection closes)."""
    return node.wait_until(
        lambda: [r for r in audit_rows(node) if predicate(r)], timeout=10, what="audit rows"
    )


def wait_closed(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Seconds until the node closes ``sock``, and what it sent before closing."""
    start = time.monotonic()
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return time.monotonic() - start, received


def trickle(sock: socket.socket, data: bytes, pause: float, limit: float) -> tuple[float, bytes]:
    """Send ``data`` a byte at a time until the node closes the connection or ``limit``."""
    start = time.monotonic()
    received = b""
    sock.settimeout(pause)
    for byte in data:
        if time.monotonic() - start > limit:
            break
        try:
            sock.sendall(bytes([byte]))
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        received += chunk
        if not chunk:
            break
    return time.monotonic() - start, received


# -- access control -----------------------------------------------------------------------


def test_access_is_checked_per_calling_aet_and_source_address(node: NodeProcess) -> None:
    assert first_reply(node, "MOD1")[:1] == b"\x02"  # rule: MOD1 from 127.0.0.0/8
    assert first_reply(node, "TESTSCU", "127.0.0.2")[:1] == b"\x02"  # allowed_calling_aets
    assert first_reply(node, "ANYONE", "127.0.0.2")[:1] == b"\x02"  # rule: any AE from .2
    # refused: permanent, service user, "calling AE title not recognized" (PS3.8 9.3.4)
    assert rejection(first_reply(node, "ANYONE")) == (1, 1, 3)
    assert rejection(first_reply(node, "REMOTE")) == (1, 1, 3)  # known AE, wrong network
    refused = echoscu(LOOPBACK, node.port, called_aet=node.ae_title, calling_aet="INTRUDER")
    assert refused.returncode != 0
    assert "calling ae title not recognized" in combined_output(refused).lower()
    audited(node, lambda r: r.calling_aet == "INTRUDER")
    rows = {(r.calling_aet, r.peer_address): r for r in audit_rows(node)}
    assert rows[("ANYONE", "127.0.0.2")].result == "accepted"
    assert rows[("ANYONE", "127.0.0.1")].result == "rejected"
    assert "not allowed" in rows[("ANYONE", "127.0.0.1")].reason
    assert "from 127.0.0.1" in rows[("REMOTE", "127.0.0.1")].reason
    assert rows[("INTRUDER", "127.0.0.1")].result == "rejected"


# -- limits --------------------------------------------------------------------------------


def test_associations_over_the_limit_get_local_limit_exceeded(node: NodeProcess) -> None:
    held = [connect(node) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(associate_rq(node.ae_title, "MOD1"))
            assert read_pdu(sock)[:1] == b"\x02"
        # transient, service provider (presentation), local limit exceeded
        assert rejection(first_reply(node, "MOD1")) == (2, 3, 2)
    finally:
        for sock in held:
            sock.sendall(RELEASE_RQ)
            sock.close()
    time.sleep(0.3)
    assert echoscu(LOOPBACK, node.port, called_aet=node.ae_title).returncode == 0


def test_max_pdu_size_is_announced_and_enforced(node: NodeProcess) -> None:
    with connect(node) as sock:
        sock.sendall(associate_rq(node.ae_title, "MOD1"))
        ac = A_ASSOCIATE_AC()
        ac.decode(read_pdu(sock))
        (max_length,) = [
            item
            for item in ac.to_primitive().user_information
            if isinstance(item, pdu_primitives.MaximumLengthNotification)
        ]
        assert max_length.maximum_length_received == 16384
        pdv = struct.pack(">IBB", 20002, 1, 0x03) + b"\x00" * 20000
        sock.sendall(struct.pack(">BxI", 0x04, len(pdv)) + pdv)
        abort = read_pdu(sock)
    assert abort[:1] == b"\x07" and abort[9] == 0x06  # A-ABORT, invalid PDU parameter


def test_instances_over_the_cap_get_out_of_resources(node: NodeProcess, tmp_path: Path) -> None:
    files = [save(image_dataset(), tmp_path / f"{i}.dcm") for i in range(5)]
    result = storescu(
        LOOPBACK, node.port, files, called_aet=node.ae_title, extra_args=["--no-halt", "-xs"]
    )
    assert parse_store_statuses(combined_output(result)) == [0, 0, 0, 0xA700, 0xA700]
    stored = audited(node, lambda r: r.instances == 3)
    assert stored and stored[-1].refused == 2 and stored[-1].outcome == "released"
    assert stored[-1].bytes > 5 * 512


def test_bytes_over_the_cap_abort_the_association(node: NodeProcess, tmp_path: Path) -> None:
    big = image_dataset(size=512)  # 512 KiB of pixels, over the 300 000-byte cap
    path = save(big, tmp_path / "big.dcm")
    result = storescu(LOOPBACK, node.port, [path], called_aet=node.ae_title, extra_args=["-xs"])
    assert parse_store_statuses(combined_output(result)) == []
    assert result.returncode != 0
    assert not list(node.spool_dir.rglob(f"{big.SOPInstanceUID}*"))
    aborted = audited(node, lambda r: "300000 bytes" in r.reason)
    assert aborted and aborted[-1].outcome == "aborted"
    assert 200_000 < aborted[-1].bytes <= 300_000


# -- deadlines: total, so trickling bytes does not extend them ----------------------------


def test_acse_timeout_bounds_a_trickled_associate_rq(node: NodeProcess) -> None:
    with connect(node) as sock:
        elapsed, _ = trickle(sock, associate_rq(node.ae_title, "MOD1"), pause=0.2, limit=8)
    assert 0.8 < elapsed < 3.0, elapsed
    assert audited(node, lambda r: r.reason.startswith("ACSE timeout"))


def test_dimse_timeout_bounds_a_trickled_message(node: NodeProcess) -> None:
    with connect(node) as sock:
        sock.sendall(associate_rq(node.ae_title, "MOD1"))
        assert read_pdu(sock)[:1] == b"\x02"
        pdv = struct.pack(">IBB", 202, 1, 0x03) + b"\x00" * 200
        elapsed, received = trickle(sock, struct.pack(">BxI", 0x04, len(pdv)) + pdv, 0.2, 8)
    # the 2 s network timeout never fires (a byte every 0.2 s); the 2 s DIMSE deadline does
    assert 1.8 < elapsed < 4.0, elapsed
    assert received[:1] == b"\x07"
    assert audited(node, lambda r: r.reason.startswith("DIMSE timeout"))


def test_network_timeout_closes_an_idle_association(node: NodeProcess) -> None:
    with connect(node) as sock:
        sock.sendall(associate_rq(node.ae_title, "MOD1"))
        assert read_pdu(sock)[:1] == b"\x02"
        elapsed, received = wait_closed(sock, 10)
    assert 1.8 < elapsed < 4.0, elapsed
    assert received[:1] == b"\x07"
    assert audited(node, lambda r: r.reason.startswith("network timeout"))


# -- DICOM TLS ----------------------------------------------------------------------------


def test_tls_store_succeeds_and_plain_tcp_is_refused(
    tls_node: NodeProcess, pki: Pki, tmp_path: Path
) -> None:
    ds = image_dataset()
    anonymous_client = dcmtk_tls_args(pki.ca.certificate)  # no client certificate needed here
    result = storescu(
        LOOPBACK,
        tls_node.port,
        [save(ds, tmp_path / "ct.dcm")],
        called_aet=tls_node.ae_title,
        extra_args=anonymous_client,
    )
    assert parse_store_statuses(combined_output(result)) == [0x0000], combined_output(result)
    assert list(tls_node.spool_dir.rglob(f"{ds.SOPInstanceUID}.dcm"))
    plain = echoscu(LOOPBACK, tls_node.port, called_aet=tls_node.ae_title, timeout=5)
    assert plain.returncode != 0
    assert audited(tls_node, lambda r: r.tls and r.result == "accepted" and r.instances == 1)
    assert audited(tls_node, lambda r: r.result == "failed" and "TLS handshake" in r.reason)


def test_stalled_tls_handshakes_do_not_block_accept(tls_node: NodeProcess, pki: Pki) -> None:
    stalled = [connect(tls_node) for _ in range(4)]  # connect, then never say a word
    try:
        start = time.monotonic()
        echo = echoscu(
            LOOPBACK,
            tls_node.port,
            called_aet=tls_node.ae_title,
            extra_args=dcmtk_tls_args(pki.ca.certificate),
        )
        assert echo.returncode == 0, combined_output(echo)
        assert time.monotonic() - start < 2.5  # well inside the stalled peers' 3 s deadline
        results: list[float] = []
        threads = [
            threading.Thread(target=lambda s=s: results.append(wait_closed(s, 10)[0]))
            for s in stalled
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 4 and max(results) < 5.0  # each closed at its ACSE deadline
    finally:
        for sock in stalled:
            sock.close()


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    mtls_node: NodeProcess, pki: Pki
) -> None:
    def echo(*args: Path) -> int:
        extra = dcmtk_tls_args(pki.ca.certificate, *args)
        return echoscu(
            LOOPBACK, mtls_node.port, called_aet=mtls_node.ae_title, extra_args=extra, timeout=5
        ).returncode

    assert echo() != 0  # no certificate at all
    assert echo(pki.stranger.key, pki.stranger.certificate) != 0  # signed by another CA
    assert echo(pki.client.key, pki.client.certificate) == 0
    accepted = audited(mtls_node, lambda r: r.result == "accepted" and r.calling_aet == "TESTSCU")
    assert "MODALITY1" in accepted[-1].tls_peer and accepted[-1].tls
    failed = [r for r in audit_rows(mtls_node) if r.result == "failed"]
    assert len(failed) >= 2 and all("TLS handshake failed" in r.reason for r in failed)


# -- configuration ------------------------------------------------------------------------


def test_config_checks_allow_rules_and_tls(tmp_path: Path, pki: Pki) -> None:
    from pacsnode.config import parse_config
    from pacsnode.errors import ConfigError
    from pacsnode.receiver import acceptor_policy

    with pytest.raises(ConfigError, match="needs ae_title, address or both"):
        parse_config("[[node.allow]]\n")
    with pytest.raises(ConfigError, match="node.allow.0.address"):
        parse_config('[[node.allow]]\naddress = "10.0.0.1/8"\n')  # host bits set
    with pytest.raises(ConfigError, match="needs certificate and private_key"):
        parse_config("[node.tls]\nenabled = true\n")
    missing = parse_config(
        f'[node.tls]\nenabled = true\ncertificate = "{tmp_path / "none.crt"}"\n'
        f'private_key = "{pki.node.key}"\n'
    )
    with pytest.raises(ConfigError, match="node.tls"):
        acceptor_policy(missing)
    policy = acceptor_policy(
        parse_config(
            '[node]\nallowed_calling_aets = ["OLD"]\n'
            '[[node.allow]]\nae_title = "CT1"\naddress = "10.1.0.0/16"\n'
            '[[node.allow]]\naddress = "::1"\n'
        )
    )
    assert policy.ssl_context is None
    assert policy.access_denied("OLD", "192.168.1.1") is None  # the old shorthand still works
    assert policy.access_denied("CT1", "10.1.2.3") is None
    assert policy.access_denied("CT1", "::ffff:10.1.2.3") is None  # IPv4-mapped IPv6 peer
    assert policy.access_denied("CT1", "10.2.0.1") is not None
    assert policy.access_denied("ANY", "::1") is None
    assert policy.access_denied("ANY", "127.0.0.1") is not None
    assert acceptor_policy(parse_config("")).access_denied("ANY", "203.0.113.9") is None  # open
