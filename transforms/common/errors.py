"""The project's exception vocabulary; the dead-letter router and the CLI match on these."""

from __future__ import annotations

import contextlib
import os

__all__ = [
    "REPORT_ENV",
    "CollectorConfigError",
    "InvalidRecord",
    "MoesifBeamError",
    "json_type",
    "report_config_error",
    "reported_config_error",
    "require_positive",
]


def require_positive(name: str, value: float) -> None:
    """Refuse a setting that must be positive; the message starts with its flag's name.

    Raises:
        ValueError: ``value`` is not greater than zero.
    """
    if not value > 0:
        msg = f"{name} must be positive, got {value}"
        raise ValueError(msg)


class MoesifBeamError(Exception):
    """Base class for errors raised by moesif-beam itself."""


class InvalidRecord(MoesifBeamError):
    """A parsed record cannot become a valid Moesif record.

    Attributes:
        field: dotted path of the offending field ("" for the record itself).
        expected_type: the JSON type that was required, when the problem is a type.
        actual_type: the JSON type that was found, when the problem is a type.
    """

    def __init__(
        self,
        detail: str,
        field: str = "",
        expected_type: str | None = None,
        actual_type: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.expected_type = expected_type
        self.actual_type = actual_type


class CollectorConfigError(MoesifBeamError):
    """The collector (or Segment) refused our configuration (401/403, unknown endpoint, ...).

    The run stops: retrying cannot help, and dead-lettering every record would only bury a
    configuration mistake. The message never contains the application id or the write key.
    Raised in a worker, it also reports itself to the launcher (see
    :func:`report_config_error`).
    """

    # One of these starts every message: MARKER when Moesif's collector refused,
    # SEGMENT_MARKER when Segment did. Runners pass only the text of a worker's exception to
    # the launcher; where workers run on other machines (Flink, Dataflow) the text is the
    # only channel there is, and this is how the launcher recognises it.
    MARKER = "moesif-beam: collector refused the configuration"
    SEGMENT_MARKER = "moesif-beam: Segment refused the configuration"
    MARKERS = (MARKER, SEGMENT_MARKER)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        report_config_error(message)

    @classmethod
    def refusal_in(cls, text: str) -> str | None:
        """The line of ``text`` from the first refusal's marker on, if it holds one."""
        found = [i for i in (text.find(marker) for marker in cls.MARKERS) if i >= 0]
        return text[min(found) :].splitlines()[0] if found else None


# Set by the launcher for a run whose workers share its machine: a file where a worker
# writes the refusal that stops the run, so the launcher reports it as what it is instead
# of finding it in the runner's wrapped traceback.
REPORT_ENV = "MOESIF_BEAM_REPORT_FILE"


def report_config_error(message: str) -> None:
    """Tell the launcher (when it listens, see :data:`REPORT_ENV`) why the run must stop."""
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as handle:
        handle.write(message.splitlines()[0] if message else "")


def reported_config_error(path: str) -> str | None:
    """The refusal a worker reported in ``path``, if any."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


# Exact types first: this runs for every value of every record.
_JSON_TYPES: dict[type, str] = {
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    tuple: "array",
    type(None): "null",
}


def json_type(value: object) -> str:
    """Name a Python value's JSON type: string, number, boolean, object, array or null."""
    kind = _JSON_TYPES.get(type(value))
    if kind is not None:
        return kind
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__
