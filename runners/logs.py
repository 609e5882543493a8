"""How the command's log lines look: text (the default) or one JSON object per line.

Both formats go through :class:`ScrubbingFormatter`, so a configured application id never
appears in a log line, whichever logger (ours or Beam's) wrote it and whatever exception
text it carries.
"""

from __future__ import annotations

import datetime
import logging

import orjson

from moesif_beam.transforms.delivery import Secret

__all__ = ["LOG_FORMATS", "JsonFormatter", "ScrubbingFormatter", "make_formatter"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ScrubbingFormatter(logging.Formatter):
    """A text formatter whose lines never show ``secret`` (see :meth:`Secret.scrub`)."""

    def __init__(self, fmt: str | None = None, *, secret: Secret | None = None) -> None:
        super().__init__(fmt)
        self._secret = secret

    def scrub(self, text: str) -> str:
        return self._secret.scrub(text) if self._secret is not None else text

    def format(self, record: logging.LogRecord) -> str:
        return self.scrub(super().format(record))


class JsonFormatter(ScrubbingFormatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, ``exception``.

    ``time`` is UTC ISO 8601 with milliseconds; ``exception`` (the traceback, with the
    stack when one was asked for) is present only when the record has one. A multi-line
    message stays one line: JSON escapes its newlines.
    """

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": self.scrub(record.getMessage()),
        }
        extra = []
        if record.exc_info:
            extra.append(self.formatException(record.exc_info))
        elif record.exc_text:
            extra.append(record.exc_text)
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        if extra:
            document["exception"] = self.scrub("\n".join(extra))
        return orjson.dumps(document).decode("utf-8")


def make_formatter(log_format: str, secret: Secret | None) -> logging.Formatter:
    """The formatter of the root logger's handlers for ``--log_format``."""
    if log_format == "json":
        return JsonFormatter(secret=secret)
    return ScrubbingFormatter(TEXT_FORMAT, secret=secret)
