"""Deterministic UIDs: the same inputs always give the same UID, so a resend replaces."""

import hashlib


def derive_uid(*parts: str) -> str:
    """Return a ``2.25`` UID (PS3.5 B.2) from a hash of ``parts``; order and boundaries matter.

    pydicom's ``generate_uid(prefix=None, ...)`` ignores its entropy sources and is
    random, so the hash is ours: 128 bits of SHA-256 over the NUL-joined parts.
    """
    digest = hashlib.sha256("\x00".join(["pacsnode", *parts]).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"
