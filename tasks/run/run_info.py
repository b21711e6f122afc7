"""What a run records of itself beside its stages: `run.json` (the config as given, code version,
when, who), and forgetting stages so that they run again (`--force`)."""

from __future__ import annotations

import socket
from typing import Any

from infra.commit import forget_stage
from infra.digest import digest_json
from infra.store import ArtifactStore, current_user, utc_now
from infra.version import code_version
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.run.plan import PlannedStage
from tasks.run.stage import stage_label


def config_for_the_record(config: PretrainConfig) -> dict[str, Any]:
    """The config as given, with storage option values (possibly secrets) replaced by '***' (as the
    config's JSON always has them)."""
    return config.model_dump(mode="json")


def write_run_info(store: ArtifactStore, config: PretrainConfig) -> None:
    recorded = config_for_the_record(config)
    store.write_json(
        RunLayout(config.run).run_info,
        {
            "run": config.run,
            "config": recorded,
            "config_digest": digest_json(recorded),
            "code_version": code_version(),
            "started_at": utc_now().isoformat(),
            "user": current_user(),
            "host": socket.gethostname(),
        },
    )


def forget_stages(store: ArtifactStore, layout: RunLayout, steps: list[PlannedStage]) -> list[str]:
    """Forget the records (and progress) of these stages, so that they run again; returns the
    labels of those that had a record."""
    return [
        stage_label(stage, iteration)
        for stage, iteration in steps
        if forget_stage(store, layout.stage_folder(stage, iteration), stage)
    ]
