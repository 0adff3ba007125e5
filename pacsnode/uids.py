"""Deterministic UIDs: the same inputs always give the same UID, so a resend replaces."""

from pydicom.uid import generate_uid


def derive_uid(*parts: str) -> str:
    """Return a ``2.25`` UID derived from ``parts`` (order matters)."""
    return str(generate_uid(prefix=None, entropy_srcs=["pacsnode", *parts]))
