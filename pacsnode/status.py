"""Named DIMSE statuses and the one place our exceptions become them."""

from __future__ import annotations

from enum import IntEnum

from pacsnode.errors import InvalidDatasetError, PacsnodeError, SpoolError
from pacsnode.wellformed import MalformedStreamError


class StoreStatus(IntEnum):
    """C-STORE response statuses the receiver answers with (PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    MISSING_OR_INVALID_ATTRIBUTE = 0xC001
    UID_MISMATCH = 0xC002
    CANNOT_DECODE = 0xC210


class DatasetMismatchError(InvalidDatasetError):
    """The dataset's SOP Class UID differs from the one the C-STORE request announced."""


class UidMismatchError(InvalidDatasetError):
    """The dataset's SOP Instance UID differs from the C-STORE request's."""


class UndecodableDatasetError(InvalidDatasetError):
    """The received bytes do not parse as a dataset in the negotiated transfer syntax."""


class DatabaseUnavailableError(PacsnodeError):
    """The database stayed locked or unreachable beyond the busy timeout."""


_STATUS_FOR: list[tuple[type[PacsnodeError], StoreStatus]] = [
    (SpoolError, StoreStatus.OUT_OF_RESOURCES),
    (DatabaseUnavailableError, StoreStatus.OUT_OF_RESOURCES),
    (DatasetMismatchError, StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS),
    (UidMismatchError, StoreStatus.UID_MISMATCH),
    (UndecodableDatasetError, StoreStatus.CANNOT_DECODE),
    (MalformedStreamError, StoreStatus.CANNOT_DECODE),
    (InvalidDatasetError, StoreStatus.MISSING_OR_INVALID_ATTRIBUTE),
]


def store_status_for(exc: PacsnodeError) -> StoreStatus:
    for kind, status in _STATUS_FOR:
        if isinstance(exc, kind):
            return status
    return StoreStatus.CANNOT_UNDERSTAND
