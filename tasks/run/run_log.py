"""A run's log kept in its own store: `<run>/logs/<UTC time>-<flow run id or pid>.log`, one file per invocation.

Prefect keeps a flow run's logs in its database, which a CLI run's temporary server throws away
and which may be wiped (the store, not Prefect, holds a run's truth). So every invocation also
writes its log lines beside the run's artifacts, where `inspect` points to them.

An object store has no append: the handler keeps the lines in memory and rewrites the whole file
every `flush_seconds` while lines arrive, and once more when it is closed. A run killed with
SIGKILL loses at most the last `flush_seconds` of its log. Lines are only written once the run's
lease is held (`start_writing`), so a refused second writer leaves no file in the run it did not
get.

Credentials never reach the file: `RedactSecrets` masks every credential value in a line before
any handler it filters formats it (the same filter guards the lines sent to Prefect).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from infra.store import ArtifactStore

LINE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
MASK = "***"


class StoreLogHandler(logging.Handler):
    """Log lines into one file of the artifact store, rewritten whole as it grows."""

    def __init__(self, store: ArtifactStore, relpath: str, flush_seconds: float = 10.0) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter(LINE_FORMAT))
        self.store = store
        self.relpath = relpath
        self.flush_seconds = flush_seconds
        self._lines: list[str] = []
        self._written = 0  # lines in the stored file
        self._writing = False
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.store.url(self.relpath)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never stop the run
            self.handleError(record)
            return
        with self.lock:
            self._lines.append(line)

    def start_writing(self) -> None:
        """From now on the file is written (the run's lease is held): at once, then every
        `flush_seconds` while new lines arrive."""
        self._writing = True
        self.flush()
        self._flusher = threading.Thread(target=self._flush_until_closed, name="run-log", daemon=True)
        self._flusher.start()

    def flush(self) -> None:
        if not self._writing:
            return
        with self.lock:
            if len(self._lines) == self._written:
                return
            text, count = "\n".join(self._lines) + "\n", len(self._lines)
        try:
            self.store.write_text(self.relpath, text)
        except Exception as error:  # noqa: BLE001 - a store outage costs log lines, not the run
            logging.getLogger(__name__).debug("could not write the run's log %s: %r", self.url, error)
            return
        self._written = max(self._written, count)

    def _flush_until_closed(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        self.flush()
        super().close()


def secret_values(credentials: dict[str, Any]) -> list[str]:
    """Every string in a (nested) credentials mapping: what a log line must never show."""
    found: list[str] = []
    for value in credentials.values():
        if isinstance(value, dict):
            found += secret_values(value)
        elif isinstance(value, str) and value:
            found.append(value)
    return found


class RedactSecrets(logging.Filter):
    """Replaces each secret value in a record's message (and its arguments) with '***'."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({secret for secret in secrets if len(secret) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, MASK)
            record.msg, record.args = message, None
        return True
