"""Malformed-PDU test: over a thousand generated hostile connections, then the node must
still be alive, answer C-ECHO and store a valid instance, with no unexpected exception.

Cases are generated from a seeded ``random.Random``, so a failure reproduces with the
printed case name. They run concurrently against a node with one-second deadlines.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dicomgen import CT_IMAGE, image_dataset, save
from nodeproc import NodeProcess
from peers import LOOPBACK, combined_output, echoscu, parse_store_statuses, storescu
from rawpdu import associate_rq
from sqlalchemy import func, select

from pacsnode.tables import AssociationLog
from pacsnode.upperlayer import VERIFICATION, encode_command

SEED = 20261130
CASES_PER_KIND = 90
SLOW_LORIS = 24

FUZZ_LIMITS = """
max_associations = 48
acse_timeout = 1.0
dimse_timeout = 1.0
network_timeout = 1.0
"""


@dataclass(frozen=True)
class Case:
    name: str
    chunks: tuple[bytes, ...]  # sent in order
    pause: float = 0.0  # between chunks (slow-loris)
    half_close: bool = True  # shut our write side after sending


def _pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body) if length is None else length) + body


def _pdv(context_id: int, control: int, value: bytes, length: int | None = None) -> bytes:
    declared = len(value) + 2 if length is None else length
    return struct.pack(">IBB", declared, context_id, control) + value


def _p_data(*pdvs: bytes, length: int | None = None) -> bytes:
    return _pdu(0x04, b"".join(pdvs), length)


RQ = associate_rq(
    "PACSNODE",
    "FUZZ",
    ((1, VERIFICATION), (3, CT_IMAGE)),
    ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
)


def _element(elem: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value) if length is None else length) + value


def _store_command(rng: random.Random) -> bytes:
    """A C-STORE-RQ command set, correct or subtly broken."""
    uid = f"1.2.3.{rng.randrange(10**6)}".encode()
    elements = [
        _element(0x0002, CT_IMAGE.encode()),
        _element(0x0100, struct.pack("<H", 0x0001)),
        _element(0x0110, struct.pack("<H", rng.randrange(65536))),
        _element(0x0700, struct.pack("<H", 0)),
        _element(0x0800, struct.pack("<H", 0x0000)),
        _element(0x1000, uid + (b"\x00" if len(uid) % 2 else b"")),
    ]
    broken = rng.randrange(8)
    if broken == 1:
        elements[1] = _element(0x0100, b"\x01")  # Command Field not US
    elif broken == 2:
        elements[5] = _element(0x1000, bytes(rng.randrange(256) for _ in range(rng.randrange(70))))
    elif broken == 3:
        del elements[1]  # no Command Field
    elif broken == 4:
        elements[0] = _element(0x0002, b"", length=0xFFFFFFF0)  # element overruns
    elif broken == 5:
        elements.insert(0, struct.pack("<HHI", 0x0008, 0x0016, 0))  # not group 0000
    elif broken == 6:
        elements[1] = _element(0x0100, struct.pack("<H", rng.choice([0x0020, 0x0FFF, 0x8001])))
    elif broken == 7:
        elements[4] = _element(0x0800, struct.pack("<H", 0x0101))  # C-STORE without dataset
    raw = b"".join(elements)
    if rng.random() < 0.3:
        raw = raw[: rng.randrange(len(raw))]
    return raw


def _flip(rng: random.Random, data: bytes, count: int) -> bytes:
    mutable = bytearray(data)
    for _ in range(count):
        mutable[rng.randrange(len(mutable))] = rng.randrange(256)
    return bytes(mutable)


def _garbage(rng: random.Random, low: int = 0, high: int = 400) -> bytes:
    return rng.randbytes(rng.randint(low, high))


def _gen_random_bytes(rng: random.Random) -> Case:
    return Case("random-bytes", (_garbage(rng, 1),))


def _gen_wrong_first_pdu(rng: random.Random) -> Case:
    pdu_type = rng.choice([0x00, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x0A, 0xFF])
    return Case("wrong-first-pdu", (_pdu(pdu_type, _garbage(rng)),))


def _gen_truncated_header(rng: random.Random) -> Case:
    return Case("truncated-header", (RQ[: rng.randint(1, 5)],), half_close=rng.random() < 0.5)


def _gen_bad_rq_length(rng: random.Random) -> Case:
    length = rng.choice([0, 1, 67, len(RQ) - 7, len(RQ) + 50, 1 << 20, (1 << 20) + 1, 0xFFFFFFFF])
    return Case("bad-rq-length", (_pdu(0x01, RQ[6:], length),), half_close=rng.random() < 0.7)


def _gen_mutated_rq(rng: random.Random) -> Case:
    return Case("mutated-rq", (_flip(rng, RQ, rng.randint(1, 12)),))


def _gen_truncated_rq(rng: random.Random) -> Case:
    cut = rng.randrange(6, len(RQ))
    return Case("truncated-rq", (_pdu(0x01, RQ[6:cut]),))


def _gen_rq_then_garbage(rng: random.Random) -> Case:
    return Case("rq-then-random-bytes", (RQ, _garbage(rng, 1)), half_close=rng.random() < 0.7)


def _gen_bad_pdv_length(rng: random.Random) -> Case:
    value = _garbage(rng, 0, 40)
    length = rng.choice([0, 1, 2, len(value) + 3, len(value) + 100, 0xFFFFFFFF])
    pdv = _pdv(rng.choice([1, 3]), 0x03, value, length)
    pdu_length = rng.choice([None, 0, 3, 5, len(pdv) + 1000])
    return Case("bad-pdv-length", (RQ, _p_data(pdv, length=pdu_length)))


def _gen_bad_context(rng: random.Random) -> Case:
    pdv = _pdv(rng.choice([0, 2, 5, 255]), rng.randrange(4), _garbage(rng, 0, 40))
    return Case("unaccepted-context", (RQ, _p_data(pdv)))


def _gen_bad_command(rng: random.Random) -> Case:
    command = _store_command(rng)
    chunks = [RQ, _p_data(_pdv(3, 0x03, command))]
    if rng.random() < 0.6:  # a dataset that is garbage, possibly in many fragments
        for _ in range(rng.randint(1, 4)):
            chunks.append(_p_data(_pdv(3, rng.choice([0x00, 0x02, 0x01]), _garbage(rng))))
    return Case("bad-command-set", tuple(chunks), half_close=rng.random() < 0.8)


def _gen_random_command(rng: random.Random) -> Case:
    return Case("random-command-set", (RQ, _p_data(_pdv(1, 0x03, _garbage(rng, 0, 120)))))


def _gen_protocol_order(rng: random.Random) -> Case:
    """Valid PDUs in the wrong order or with wrong bodies: release mid-message, second RQ…"""
    echo = encode_command(0x0030, 1, VERIFICATION, None, 0)
    choices = [
        (RQ, RQ),
        (RQ, _pdu(0x05, b"\x00" * 4, rng.choice([0, 2, 1 << 20, 0xFFFFFFFF]))),
        (RQ, _p_data(_pdv(1, 0x01, echo[:10])), _pdu(0x05, b"\x00" * 4)),
        (RQ, _pdu(0x02, _garbage(rng))),
        (RQ, _pdu(0x06, b"\x00" * 4)),
        (RQ, _pdu(0x07, b"\x00" * 4), _garbage(rng)),
        (RQ, _p_data(_pdv(3, 0x00, _garbage(rng)))),  # dataset before any command
        (RQ, _p_data(_pdv(1, 0x03, echo)), _p_data(_pdv(1, 0x03, echo)), _garbage(rng)),
    ]
    return Case("protocol-order", rng.choice(choices))


def _gen_slow_loris(rng: random.Random) -> Case:
    target = rng.choice([RQ, RQ + _p_data(_pdv(3, 0x03, _store_command(rng)))])
    stop = rng.randrange(len(target))
    pieces = tuple(target[i : i + 1] for i in range(min(stop, 40)))
    return Case("slow-loris", pieces or (b"\x01",), pause=0.08, half_close=False)


GENERATORS: list[Callable[[random.Random], Case]] = [
    _gen_random_bytes,
    _gen_wrong_first_pdu,
    _gen_truncated_header,
    _gen_bad_rq_length,
    _gen_mutated_rq,
    _gen_truncated_rq,
    _gen_rq_then_garbage,
    _gen_bad_pdv_length,
    _gen_bad_context,
    _gen_bad_command,
    _gen_random_command,
    _gen_protocol_order,
]


def generate_cases(seed: int = SEED) -> list[Case]:
    rng = random.Random(seed)
    cases = [gen(rng) for gen in GENERATORS for _ in range(CASES_PER_KIND)]
    cases += [_gen_slow_loris(rng) for _ in range(SLOW_LORIS)]
    rng.shuffle(cases)
    return cases


def run_case(port: int, case: Case) -> float:
    """Play one case; returns how long the node took to end the connection after it."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        try:
            for chunk in case.chunks:
                sock.sendall(chunk)
                if case.pause:
                    time.sleep(case.pause)
            if case.half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return 0.0  # the node already hung up: fine
        start = time.monotonic()
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return time.monotonic() - start


def test_generated_cases_are_deterministic() -> None:
    assert generate_cases() == generate_cases()
    assert len(generate_cases()) >= 1000


def test_malformed_pdus_leave_the_node_serving(tmp_path: Path) -> None:
    cases = generate_cases()
    node = NodeProcess(
        tmp_path / "node", enabled=(), components="receiver", node_toml=FUZZ_LIMITS
    ).start()
    try:
        start = time.monotonic()
        with ThreadPoolExecutor(24) as pool:
            waits = list(pool.map(lambda case: run_case(node.port, case), cases))
        took = time.monotonic() - start
        slowest = max(range(len(cases)), key=waits.__getitem__)
        print(
            f"\n{len(cases)} malformed-PDU cases ({len(GENERATORS)} kinds + slow-loris) in "
            f"{took:.1f} s; slowest hang-up {waits[slowest]:.2f} s ({cases[slowest].name})"
        )
        # every connection was ended by the node within its deadlines (1 s + watchdog tick)
        assert waits[slowest] < 3.0, cases[slowest]
        assert node.alive()
        assert echoscu(LOOPBACK, node.port, called_aet=node.ae_title).returncode == 0
        ds = image_dataset()
        result = storescu(
            LOOPBACK, node.port, [save(ds, tmp_path / "after.dcm")], called_aet=node.ae_title
        )
        assert parse_store_statuses(combined_output(result)) == [0x0000]
        assert list(node.spool_dir.rglob(f"{ds.SOPInstanceUID}.dcm"))
        log = node.log()
        assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
        with node.sessions()() as s:
            rows = s.scalar(select(func.count(AssociationLog.id)))
            assert rows is not None and rows >= len(cases)
    finally:
        node.stop()
    assert not list(node.spool_dir.rglob("*.tmp"))
