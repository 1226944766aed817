"""One structured logger for the node.

Lines are ``key=value`` text or one JSON object per line (``--log-json``). py-libp2p logs routine
events (failed dials, identify races, stream resets) at ERROR/WARNING; we demote every record from
its loggers to DEBUG so that a real error from our own code stands out.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

NOISY_LOGGERS = ("libp2p", "multiaddr", "async_service", "async_exit_stack")


class _Demote(logging.Filter):
    """Handler filter: records from noisy third-party loggers become DEBUG (shown only at debug).

    Applied on our handler, not on loggers, so it covers every child logger py-libp2p creates
    lazily (``libp2p.network.swarm`` ...), whenever it is created.
    """

    def __init__(self, show_debug: bool) -> None:
        super().__init__()
        self.show_debug = show_debug

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in NOISY_LOGGERS:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.show_debug
        return True


def err_text(exc: object, limit: int | None = None) -> str:
    """An exception (or a reason) as a log field: its text, at most ``limit`` characters, or its
    type where the text is empty (a timeout's)."""
    return str(exc)[:limit] or type(exc).__name__


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in (getattr(record, "kv", {}) or {}).items():
            fields[k] = err_text(v) if isinstance(v, BaseException) else v
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, default=str)
        head = f"{fields.pop('ts')} {fields.pop('level'):<7} {fields.pop('logger')}: {fields.pop('msg')}"
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{head} {tail}".rstrip()


def setup_logging(level: str = "info", as_json: bool = False) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    numeric = getattr(logging, level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(as_json))
    handler.addFilter(_Demote(show_debug=numeric <= logging.DEBUG))
    root.addHandler(handler)
    root.setLevel(numeric)
    # py-libp2p detaches its logger (no handler, propagate=False) unless LIBP2P_DEBUG is set, so
    # its warnings fall through to Python's bare last-resort printer. Route them through us.
    for name in NOISY_LOGGERS:
        lg = logging.getLogger(name)
        lg.propagate = True
        lg.setLevel(logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING)


def get_logger(name: str) -> logging.LoggerAdapter:
    """A logger whose calls accept structured fields: ``log.info("msg", extra={"kv": {...}})``."""
    return logging.getLogger(name)  # type: ignore[return-value]


def kv(**fields: Any) -> dict[str, Any]:
    """Shorthand for structured fields: ``log.info("dialled", extra=kv(peer=pid))``."""
    return {"kv": fields}
