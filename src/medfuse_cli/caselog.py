"""Log lines of one batch case tagged with its id (``WARNING  CASE: ...``), in either engine."""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

CASE: contextvars.ContextVar[str | None] = contextvars.ContextVar("medfuse_case", default=None)


class CaseFormatter(logging.Formatter):
    """``fmt`` with the message prefixed by the case the logging thread is fusing, if any."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        case = CASE.get()
        if case is None:
            return super().formatMessage(record)
        message = record.message
        record.message = f"{case}: {message}"  # for this line only: the record goes on to other handlers
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


@contextmanager
def case_log(case_id: str, level: int | None = None) -> Iterator[None]:
    """Tag this thread's log lines with ``case_id``; with ``level`` (a dask worker, where nothing else
    shows them) also print them on stderr from that level up (``--quiet``: errors only)."""
    token = CASE.set(case_id)
    logger = logging.getLogger("medfuse_cli")
    handler = None
    if level is not None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(level)
        handler.setFormatter(CaseFormatter("%(levelname)s  %(message)s"))
        me = threading.get_ident()
        handler.addFilter(lambda record: record.thread == me)  # a worker may run several cases at once
        if logger.getEffectiveLevel() > level:
            logger.setLevel(level)
        logger.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        CASE.reset(token)
