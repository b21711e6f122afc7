"""A run's log in its store (tasks/run/run_log.py): written once the lease is held, rewritten as it
grows, credentials masked; and the routing the flow sets up for every entry point."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from infra.store import ArtifactStore
from tasks.run.layout import RunLayout
from tasks.run.run_log import RedactSecrets, StoreLogHandler, secret_values


def test_the_log_is_written_only_once_started_then_rewritten_whole_with_credentials_masked(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    relpath = RunLayout("r").log(datetime(2026, 12, 5, 3, 4, 5, tzinfo=timezone.utc), "flow-run-1")
    assert relpath == "r/logs/20261205T030405Z-flow-run-1.log"
    handler = StoreLogHandler(store, relpath, flush_seconds=3600)
    handler.addFilter(RedactSecrets(secret_values({"key": "AKIAEXAMPLE", "client_kwargs": {"aws_session_token": "tok3n-value"}})))
    logger = logging.getLogger("tasks.test_run_log")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("before the lease")
        handler.flush()
        assert not store.exists(relpath)  # a refused writer leaves nothing in a run it did not get
        handler.start_writing()
        assert store.read_text(relpath).endswith("tasks.test_run_log: before the lease\n")
        logger.warning("opening s3 with key %s and token %s", "AKIAEXAMPLE", "tok3n-value")
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = store.read_text(relpath)
    assert text.splitlines()[-1].endswith("opening s3 with key *** and token ***")
    assert "AKIAEXAMPLE" not in text and "tok3n" not in text
    assert len(text.splitlines()) == 2
