"""The project's exception vocabulary; the dead-letter router and the CLI match on these."""

from __future__ import annotations

__all__ = ["CollectorConfigError", "InvalidRecord", "MoesifBeamError", "json_type"]


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
    """The collector refused our configuration (401/403, unknown endpoint, ...).

    The run stops: retrying cannot help, and dead-lettering every record would only bury a
    configuration mistake. The message never contains the application id.
    """

    # Found in the text of whatever exception a runner wraps ours in, so the CLI can print
    # our one clear line instead of a worker traceback.
    MARKER = "moesif-beam: collector refused the configuration"


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
