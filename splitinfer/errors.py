"""Domain errors shared by all roles.

They are raised deep inside the code and mapped to transport status codes in exactly one place per
transport (gRPC in ``cloud_server.errors``, HTTP in ``edge_agent.app``).
"""


class SplitInferError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidInput(SplitInferError):
    """The caller sent something malformed (bad tensor, shape, datatype, payload, image)."""


class NotFound(SplitInferError):
    """The caller asked for a model, version or split that does not exist."""


class Unavailable(SplitInferError):
    """The service is not ready, is draining, or a dependency is unreachable."""


class BundleError(SplitInferError):
    """A plan bundle is missing, corrupted, unsafe or of an unsupported version."""


class DataError(SplitInferError):
    """A dataset cannot be read."""


class DeadlineExceeded(SplitInferError):
    """The caller's deadline passed before the work was done; the work was not (or no longer) done."""


class Unauthenticated(SplitInferError):
    """The caller presented no credentials, or credentials this service does not accept."""


class ConfigError(SplitInferError):
    """A daemon's settings or a file they name (certificate, tokens) are missing or invalid."""
