"""Which stage failures are worth a Prefect retry: storage and network hiccups, not bad input."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ConnectionError as BotocoreConnectionError

from infra.parts import PartsFailed
from tasks.config import ConfigError
from tasks.manifest import ManifestError


def is_transient(error: BaseException) -> bool:
    """Storage and network errors may pass; errors in the data or the config will not.

    A stage whose parts failed is retried too: the retry resumes from the parts that finished,
    and a part that fails for a reason in the data fails again, cheaply.
    """
    if isinstance(error, (ConfigError, ManifestError, FileNotFoundError, PermissionError)):
        return False
    return isinstance(error, (OSError, TimeoutError, ConnectionError, BotocoreConnectionError, PartsFailed))


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient failures."""
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - we only classify it
        return is_transient(error)
    return False
