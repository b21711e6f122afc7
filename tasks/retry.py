"""Which stage failures are worth a Prefect retry: storage and network hiccups, not bad input."""

from __future__ import annotations

from typing import Any

from tasks.config import ConfigError
from tasks.manifest import ManifestError


def is_transient(error: BaseException) -> bool:
    """OSErrors and timeouts may pass; errors in the data or the config will not."""
    if isinstance(error, (ConfigError, ManifestError, FileNotFoundError, PermissionError)):
        return False
    return isinstance(error, (OSError, TimeoutError, ConnectionError))


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient failures."""
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - we only classify it
        return is_transient(error)
    return False
