"""A structural check of an encoded dataset: every declared length must fit the bytes received.

pydicom reads truncated or overlong streams leniently (a short value is simply
short); the receiver must not acknowledge such an object as stored. This walks
element headers only, never values, so it costs microseconds per instance.
"""

from __future__ import annotations

import struct

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacsnode.errors import InvalidDatasetError

_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_CHECKED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
_ENCAPSULATED_TS_PREFIXES = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5")


class MalformedStreamError(InvalidDatasetError):
    """The encoded dataset's element lengths do not add up."""


def check_stream(
    data: bytes | memoryview, transfer_syntax: str, collect: dict[int, bytes] | None = None
) -> bool:
    """Raise :class:`MalformedStreamError` naming the element whose length overruns the stream.

    Values of the top-level elements whose tags are keys of ``collect`` are stored in it
    on the way, so the receiver needs no second parse for its header. Deflated and
    big-endian streams are left to the parser: returns False for them, True when walked.
    """
    explicit = transfer_syntax != ImplicitVRLittleEndian
    if transfer_syntax not in _CHECKED and not transfer_syntax.startswith(
        _ENCAPSULATED_TS_PREFIXES
    ):
        return False
    end = _walk(memoryview(data), 0, len(data), explicit, stop=None, collect=collect)
    if end != len(data):
        raise MalformedStreamError(f"{len(data) - end} stray bytes after the last element")
    return True


def _header(buf: memoryview, pos: int, limit: int, explicit: bool) -> tuple[bytes, int, int]:
    """(VR or b"", value length, header size) of the element at ``pos``."""
    group = struct.unpack_from("<H", buf, pos)[0]
    if group == 0xFFFE or not explicit:
        return b"", struct.unpack_from("<I", buf, pos + 4)[0], 8
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        if limit - pos < 12:
            raise MalformedStreamError(f"element ({group:04X},...) header truncated")
        return vr, struct.unpack_from("<I", buf, pos + 8)[0], 12
    return vr, struct.unpack_from("<H", buf, pos + 6)[0], 8


def _fits(what: str, length: int, pos: int, limit: int) -> None:
    if length > limit - pos:
        raise MalformedStreamError(f"{what} declares {length} bytes, only {limit - pos} follow")


def _walk(
    buf: memoryview,
    pos: int,
    limit: int,
    explicit: bool,
    stop: tuple[int, int] | None,
    collect: dict[int, bytes] | None = None,
) -> int:
    """Walk elements from ``pos`` to ``limit`` or past the ``stop`` delimiter."""
    while pos < limit:
        if limit - pos < 8:
            raise MalformedStreamError(f"{limit - pos} stray bytes where an element should start")
        tag = struct.unpack_from("<HH", buf, pos)
        if stop is not None and tag == stop:
            return pos + 8
        name = f"element ({tag[0]:04X},{tag[1]:04X})"
        vr, length, header = _header(buf, pos, limit, explicit)
        pos += header
        if length == _UNDEFINED:
            pixels = tag == (0x7FE0, 0x0010)
            pos = _items(buf, pos, limit, explicit and vr != b"UN", name, True, not pixels)
            continue
        _fits(name, length, pos, limit)
        if collect is not None and (tag[0] << 16 | tag[1]) in collect:
            collect[tag[0] << 16 | tag[1]] = bytes(buf[pos : pos + length])
        if vr == b"SQ":
            _items(buf, pos, pos + length, explicit, name, False, True)
        pos += length
    if stop is not None:
        raise MalformedStreamError("an item is not closed before the end of the stream")
    return pos


def _items(
    buf: memoryview,
    pos: int,
    limit: int,
    explicit: bool,
    owner: str,
    delimited: bool,
    nested: bool,
) -> int:
    """Walk the items of a sequence (or pixel data fragments) of ``owner``."""
    while True:
        if not delimited and pos == limit:
            return pos
        if limit - pos < 8:
            raise MalformedStreamError(f"{owner} is not closed by a delimiter")
        tag = struct.unpack_from("<HH", buf, pos)
        length = struct.unpack_from("<I", buf, pos + 4)[0]
        if delimited and tag == _SEQ_END:
            return pos + 8
        if tag != _ITEM:
            raise MalformedStreamError(f"{owner} holds ({tag[0]:04X},{tag[1]:04X}), not an item")
        pos += 8
        if length == _UNDEFINED:
            if not nested:
                raise MalformedStreamError(f"{owner} has a fragment of undefined length")
            pos = _walk(buf, pos, limit, explicit, stop=_ITEM_END)
            continue
        _fits(f"an item of {owner}", length, pos, limit)
        if nested:
            _walk(buf, pos, pos + length, explicit, stop=None)
        pos += length
