"""One exception hierarchy for the node; messages name the culprit."""


class PacsnodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(PacsnodeError):
    """The configuration file is missing, unreadable or invalid."""


class ManifestError(PacsnodeError):
    """A model folder's manifest or weights are invalid."""


class WeightsMismatchError(ManifestError):
    """The weights file does not match the sha256 recorded in the manifest."""


class InvalidDatasetError(PacsnodeError):
    """A received dataset cannot be parsed or lacks identifying attributes."""


class SpoolError(PacsnodeError):
    """The spool cannot take the instance (disk full, read-only, permissions)."""


class InputError(PacsnodeError):
    """A series cannot be processed by a model (unsupported pixels, geometry...).

    Permanent: retrying will not help, so the job goes straight to dead.
    """


class VolumeError(InputError):
    """A CT series cannot be assembled into one volume (gap, mixed orientation, tilt...)."""


class DeliveryError(PacsnodeError):
    """A destination refused or could not be reached."""


class AdminError(PacsnodeError):
    """An administrator's command cannot be carried out as asked (nothing matches, wrong state)."""
