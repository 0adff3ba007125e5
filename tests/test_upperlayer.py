"""The receiver's own upper layer: Part 10 prefix, DIMSE command codecs, real peers, abuse."""

from __future__ import annotations

import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomgen import CT_IMAGE, image_dataset, save
from nodeproc import NodeProcess
from peers import (
    LOOPBACK,
    combined_output,
    echoscu,
    free_port,
    parse_store_statuses,
    storescu,
)
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC
from rawpdu import associate_rq, read_pdu
from sqlalchemy import func, select

from pacsnode.receiver import part10_prefix
from pacsnode.spool import spool_path
from pacsnode.tables import Instance, Series
from pacsnode.upperlayer import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    VERIFICATION,
    ProtocolError,
    StoreRequest,
    encode_command,
    parse_command,
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    proc = NodeProcess(tmp_path_factory.mktemp("node"), enabled=(), components="receiver").start()
    yield proc
    proc.stop()


def _explicit_le(ds: pydicom.Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _store(node: NodeProcess, files: list[Path]) -> list[int]:
    result = storescu(LOOPBACK, node.port, files, called_aet=node.ae_title, extra_args=["-xs"])
    return parse_store_statuses(combined_output(result))


# -- codecs --------------------------------------------------------------------------------


@pytest.mark.parametrize(("instance_uid", "calling_aet"), [("1.2.345", "ODD"), ("1.2.34", "")])
def test_part10_prefix_is_pydicom_file_meta(instance_uid: str, calling_aet: str) -> None:
    ds = image_dataset()
    ds.SOPInstanceUID = instance_uid
    request = StoreRequest(CT_IMAGE, instance_uid, ExplicitVRLittleEndian, calling_aet, "x:1")
    prefix = part10_prefix(request)
    assert pydicom.filereader.read_preamble(BytesIO(prefix), False) == b"\x00" * 128
    read = pydicom.dcmread(BytesIO(prefix + _explicit_le(ds)))
    meta = read.file_meta
    assert meta.MediaStorageSOPClassUID == CT_IMAGE
    assert meta.MediaStorageSOPInstanceUID == instance_uid
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION
    assert meta.FileMetaInformationGroupLength == len(prefix) - 132 - 12
    if calling_aet:
        assert meta.SourceApplicationEntityTitle == calling_aet
    else:
        assert "SourceApplicationEntityTitle" not in meta
    assert read.SOPInstanceUID == instance_uid and read.PixelData == ds.PixelData
    # byte for byte what pydicom itself writes (odd values padded with NUL / space)
    expected = FileMetaDataset()
    expected.FileMetaInformationVersion = b"\x00\x01"
    expected.MediaStorageSOPClassUID = CT_IMAGE
    expected.MediaStorageSOPInstanceUID = instance_uid
    expected.TransferSyntaxUID = ExplicitVRLittleEndian
    expected.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    expected.ImplementationVersionName = IMPLEMENTATION_VERSION
    if calling_aet:
        expected.SourceApplicationEntityTitle = calling_aet
    fp = DicomBytesIO()
    write_file_meta_info(fp, expected, enforce_standard=True)
    assert prefix[132:] == fp.getvalue()


def test_encode_command_decodes_as_c_store_rsp() -> None:
    raw = encode_command(0x8001, 7, CT_IMAGE, "1.2.345", 0xC001, "e" * 70)
    rsp = decode(BytesIO(raw), True, True)
    assert rsp.CommandField == 0x8001
    assert rsp.Status == 0xC001
    assert rsp.MessageIDBeingRespondedTo == 7
    assert rsp.AffectedSOPClassUID == CT_IMAGE
    assert rsp.AffectedSOPInstanceUID == "1.2.345"
    assert rsp.CommandDataSetType == 0x0101
    assert rsp.ErrorComment == "e" * 64
    assert rsp.CommandGroupLength == len(raw) - 12
    plain = decode(BytesIO(encode_command(0x8030, 1, VERIFICATION, None, 0)), True, True)
    assert "ErrorComment" not in plain and "AffectedSOPInstanceUID" not in plain


def _c_store_rq_command() -> bytes:
    primitive = C_STORE()
    primitive.MessageID = 9
    primitive.AffectedSOPClassUID = CT_IMAGE
    primitive.AffectedSOPInstanceUID = "1.2.345"
    primitive.Priority = 2
    primitive.DataSet = BytesIO(b"\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


def test_parse_command_reads_pynetdicom_c_store_rq() -> None:
    command = parse_command(_c_store_rq_command())
    assert (command.field, command.message_id, command.has_dataset) == (0x0001, 9, True)
    assert (command.sop_class_uid, command.sop_instance_uid) == (CT_IMAGE, "1.2.345")


def test_parse_command_rejects_truncated_and_fieldless_command_sets() -> None:
    raw = _c_store_rq_command()
    for cut in (3, 9):
        with pytest.raises(ProtocolError):
            parse_command(raw[:-cut])
    message_id_only = struct.pack("<HHIH", 0x0000, 0x0110, 2, 9)
    with pytest.raises(ProtocolError, match="Command Field"):
        parse_command(message_id_only)


# -- real peers ----------------------------------------------------------------------------


def test_pynetdicom_echo_store_and_release(node: NodeProcess) -> None:
    ds = image_dataset()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate(LOOPBACK, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        echo = assoc.send_c_echo()
        store = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert assoc.is_released and not assoc.is_aborted
    assert int(echo.Status) == 0x0000
    assert int(store.Status) == 0x0000
    stored = pydicom.dcmread(
        spool_path(node.spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    )
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.SourceApplicationEntityTitle == "PYSCU"
    assert np.array_equal(stored.pixel_array, ds.pixel_array)


def test_concurrent_storescu_into_one_series(node: NodeProcess, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    batches = [
        [
            save(
                image_dataset(study_uid=study, series_uid=series, position_z=10 * i + j),
                tmp_path / f"{i}-{j}.dcm",
            )
            for j in range(10)
        ]
        for i in range(4)
    ]
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda files: _store(node, files), batches))
    assert statuses == [[0x0000] * 10] * 4
    with node.sessions()() as s:
        row = s.scalar(select(Series).where(Series.series_uid == series))
        assert row is not None and row.instance_count == 40
        count = s.scalar(select(func.count()).where(Instance.series_id == row.id))
        assert count == 40


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_request_instance_uid_is_refused(node: NodeProcess) -> None:
    ds = image_dataset()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.abc"
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate(LOOPBACK, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status is not None and int(status.Status) == 0xC001
    assert "SOP Instance UID" in str(status.ErrorComment)
    assert not (node.spool_dir / ds.StudyInstanceUID).exists()
    assert not list(node.spool_dir.rglob("*.tmp"))
    with node.sessions()() as s:
        assert s.scalar(select(Instance).where(Instance.sop_instance_uid == "1.2.abc")) is None


# -- protocol abuse ------------------------------------------------------------------------


def _p_data(pdv_length: int, context_id: int, value: bytes) -> bytes:
    pdv = struct.pack(">IBB", pdv_length, context_id, 0x03) + value
    return struct.pack(">BxI", 0x04, len(pdv)) + pdv


# payload sent (after an accepted association when the flag is set), A-ABORT reason expected
ABUSE = {
    "garbage": (False, b"\x99" * 20, None),
    "pdv-overruns-pdu": (True, _p_data(100, 1, b"\x00" * 4), 0x06),
    "unaccepted-context": (True, _p_data(6, 3, b"\x00" * 4), None),
    "second-associate-rq": (True, None, 0x02),
    "unknown-pdu-type": (True, b"\x0a\x00\x00\x00\x00\x02\x00\x00", 0x01),
}


@pytest.mark.parametrize("case", list(ABUSE))
def test_protocol_abuse_is_aborted_and_node_keeps_serving(
    node: NodeProcess, tmp_path: Path, case: str
) -> None:
    associate_first, payload, reason = ABUSE[case]
    with socket.create_connection((LOOPBACK, node.port), timeout=10) as sock:
        if associate_first:
            sock.sendall(associate_rq(node.ae_title))
            accept = read_pdu(sock)
            assert accept[:1] == b"\x02"
            ac = A_ASSOCIATE_AC()
            ac.decode(accept)
            results = ac.to_primitive().presentation_context_definition_results_list
            assert [(cx.context_id, cx.result) for cx in results] == [(1, 0)]
        sock.sendall(payload if payload is not None else associate_rq(node.ae_title))
        abort = read_pdu(sock)
        assert abort[:9] == bytes.fromhex("070000000004000002")  # A-ABORT from the provider
        assert reason is None or abort[9] == reason
        assert read_pdu(sock) == b""  # and the node closed the connection
    assert echoscu(LOOPBACK, node.port, called_aet=node.ae_title).returncode == 0
    assert _store(node, [save(image_dataset(), tmp_path / "after.dcm")]) == [0x0000]


def test_disk_full_mid_dataset_answers_out_of_resources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC after the first fragment: 0xA700 for that instance, no abort, no partial file."""
    import errno
    import os

    from pacsnode import spool
    from pacsnode.config import parse_config
    from pacsnode.db import make_engine, make_sessionmaker, upgrade
    from pacsnode.receiver import Receiver

    config = parse_config(
        f'[node]\nhost = "{LOOPBACK}"\nport = {free_port()}\nmax_pdu_size = 16384\n'
        f'[storage]\nspool_dir = "{tmp_path / "spool"}"\n'
        f'database_url = "sqlite:///{tmp_path / "db.sqlite"}"\n'
    )
    engine = make_engine(config.storage.database_url)
    upgrade(engine)
    receiver = Receiver(config, make_sessionmaker(engine))
    receiver.initialize()
    assert receiver.server is not None
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    try:
        ae = AE(ae_title="FULLSCU")
        ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        assoc = ae.associate(LOOPBACK, receiver.server.port, ae_title="PACSNODE")
        assert assoc.is_established
        monkeypatch.setattr(spool.os, "write", failing_write)
        status = assoc.send_c_store(image_dataset(size=256))
        monkeypatch.setattr(spool.os, "write", real_write)
        assert status is not None and int(status.Status) == 0xA700
        assert assoc.is_established, "the association must survive a full disk"
        second = assoc.send_c_store(image_dataset(size=16))
        assert second is not None and int(second.Status) == 0x0000
        assoc.release()
    finally:
        receiver.shutdown()
        engine.dispose()
    assert calls["n"] > 1, "the failure was never injected"
    assert not [p for p in (tmp_path / "spool").rglob("*") if p.name.endswith(".tmp")]
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 1
