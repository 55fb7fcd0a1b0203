"""The agent's log, ``agent.log``: one JSON object per line (``time``, ``level``, ``event``,
``service``, ``instance``, ``message``, and ``from``/``to`` for a transition), rotated by
size like the instances' logs. Every transition, probe verdict change, restart, rollout
step and warning the event log records is here too, so a log shipper needs nothing else.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from pathlib import Path

__all__ = ["JsonFormatter", "log_to"]

_FIELDS = ("event", "service", "instance", "from", "to")


class JsonFormatter(logging.Formatter):
    """A record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
        }
        for key in _FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                doc[key] = value
        doc.setdefault("event", "log")
        doc["message"] = record.getMessage()
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def log_to(path: Path, max_bytes: int = 10 << 20, keep: int = 3) -> None:
    """Sends the ``corral`` logger (INFO and up) to ``path`` as JSON lines, rotated; the file
    is owner-only like everything in the state directory."""
    old = os.umask(0o077)
    try:
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=keep)
    finally:
        os.umask(old)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("corral")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
