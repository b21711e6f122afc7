"""Stage: an iteration's audit report, from its stage records alone.

    iter-N/report.json   what ran, when, on what (config and input digests), counts, sizes, metrics
    iter-N/report.md     the same for people, with plots:
    iter-N/plots/*.png   training loss and accuracy, cluster sizes, cluster quality across iterations

The report is rebuilt whenever it is asked for (cheap); it never feeds another stage.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any

from matplotlib.figure import Figure
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from infra.store import ArtifactStore, StageRecord, read_record
from tasks.config import ITERATION_STAGES
from tasks.kmeans import FIT_REPORT


def read_records(store: ArtifactStore, run: str, iteration: int) -> dict[str, StageRecord]:
    """The committed records of an iteration's stages, by stage."""
    records = {stage: read_record(store, run, f"iter-{iteration}", stage) for stage in ITERATION_STAGES}
    return {stage: record for stage, record in records.items() if record is not None}


def _png(figure: Figure) -> bytes:
    """Figures are built with matplotlib's object API: no pyplot, no global state, no display."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def training_plot(curve: list[dict[str, float]]) -> bytes:
    figure = Figure(figsize=(9, 3.2))
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    steps = [entry["step"] for entry in curve]
    loss_axis.plot(steps, [entry["loss"] for entry in curve])
    loss_axis.set(title="training loss", xlabel="step", ylabel="cross-entropy (masked frames)")
    accuracy_axis.plot(steps, [entry["masked_accuracy"] for entry in curve], label="masked")
    accuracy_axis.plot(steps, [entry["unmasked_accuracy"] for entry in curve], label="unmasked")
    accuracy_axis.set(title="prediction accuracy", xlabel="step")
    accuracy_axis.legend()
    return _png(figure)


def cluster_size_plot(sizes: list[int]) -> bytes:
    figure = Figure(figsize=(6, 3.2))
    axis = figure.subplots()
    axis.bar(range(len(sizes)), sorted(sizes, reverse=True), width=1.0)
    axis.set(title=f"cluster sizes (k={len(sizes)}), largest first", xlabel="cluster rank", ylabel="frames")
    return _png(figure)


def quality_plot(by_iteration: dict[int, dict[str, float]]) -> bytes:
    figure = Figure(figsize=(6, 3.2))
    axis = figure.subplots()
    iterations = sorted(by_iteration)
    for measure in ("pnmi", "phone_purity", "cluster_purity"):
        axis.plot(iterations, [by_iteration[i][measure] for i in iterations], marker="o", label=measure)
    axis.set(title="cluster quality across iterations", xlabel="iteration", xticks=iterations)
    axis.legend()
    return _png(figure)


def build_report(store: ArtifactStore, run: str, iteration: int, records: dict[str, StageRecord]) -> tuple[dict[str, Any], str]:
    """Write iter-N/report.json, report.md and plots from the iteration's records; returns the
    report and its markdown."""
    scope = posixpath.join(run, f"iter-{iteration}")
    plots: dict[str, str] = {}
    if "train" in records:
        curve = store.read_json(posixpath.join(scope, "model", "train_log.json")) or []
        if curve:
            store.write_bytes(posixpath.join(scope, "plots", "training.png"), training_plot(curve))
            plots["training"] = "plots/training.png"
    if "kmeans" in records and (fit := store.read_json(posixpath.join(scope, FIT_REPORT))):
        store.write_bytes(posixpath.join(scope, "plots", "cluster_sizes.png"), cluster_size_plot(fit["cluster_sizes"]))
        plots["cluster_sizes"] = "plots/cluster_sizes.png"
    quality = {}
    for earlier in range(1, iteration + 1):
        labels = records.get("labels") if earlier == iteration else read_record(store, run, f"iter-{earlier}", "labels")
        if labels is not None and labels.metrics.get("quality"):
            quality[earlier] = labels.metrics["quality"]
    if quality:
        store.write_bytes(posixpath.join(scope, "plots", "quality.png"), quality_plot(quality))
        plots["quality"] = "plots/quality.png"

    report = {
        "run": run,
        "iteration": iteration,
        "stages": {name: record.model_dump(mode="json") for name, record in records.items()},
        "lineage": {
            name: {"key": record.key, "config_digest": record.config_digest, "inputs": record.inputs, "output": record.output_digest}
            for name, record in records.items()
        },
        "plots": plots,
    }
    markdown = render_markdown(report, records)
    store.write_json(posixpath.join(scope, "report.json"), report)
    store.write_text(posixpath.join(scope, "report.md"), markdown)
    return report, markdown


def summary_rows(records: dict[str, StageRecord]) -> list[dict[str, Any]]:
    """One row per committed stage: what Prefect's table artifact and report.md show."""
    return [
        {
            "stage": name,
            "finished": record.finished_at.isoformat(timespec="seconds"),
            "seconds": record.seconds,
            "bytes": sum(record.sizes.values()),
            "output digest": record.output_digest[:12],
            "key metrics": _headline(name, record),
        }
        for name, record in records.items()
    ]


def _headline(stage: str, record: StageRecord) -> str:
    counts, metrics = record.counts, record.metrics
    if stage == "features":
        return f"{counts['frames']} frames x {counts['dim']}, {counts['audio_hours']} h"
    if stage == "kmeans":
        return f"k={counts['k']}, inertia/frame {metrics['inertia_per_frame']:.4g}, {counts['iterations']} iterations"
    if stage == "labels":
        quality = metrics.get("quality")
        phones = f", PNMI {quality['pnmi']:.3f}, phone purity {quality['phone_purity']:.3f}, cluster purity {quality['cluster_purity']:.3f}" if quality else ""
        return f"{counts['frames']} labels @ {metrics['label_rate']:g}/s, {metrics['used_clusters']} clusters used{phones}"
    if stage == "train":
        return (
            f"{counts['steps']} steps, loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}, "
            f"masked accuracy {metrics['masked_accuracy']:.3f} (chance {metrics['chance_accuracy']:.3f})"
        )
    return ""


def render_markdown(report: dict[str, Any], records: dict[str, StageRecord]) -> str:
    lines = [f"# {report['run']}: iteration {report['iteration']}", "", "| stage | finished | seconds | bytes | output digest | key metrics |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {row['stage']} | {row['finished']} | {row['seconds']} | {row['bytes']} | `{row['output digest']}` | {row['key metrics']} |"
        for row in summary_rows(records)
    ]
    lines += ["", "## Lineage", "", "| stage | key | inputs |", "|---|---|---|"]
    for name, lineage in report["lineage"].items():
        inputs = ", ".join(f"{k} `{v[:12]}`" for k, v in lineage["inputs"].items())
        lines.append(f"| {name} | `{lineage['key'][:12]}` | {inputs} |")
    if report["plots"]:
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in report["plots"].items()]
    return "\n".join(lines) + "\n"


def artifact_key(run: str, iteration: int) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    cleaned = "".join(character if character.isalnum() else "-" for character in run.lower())
    return f"{cleaned}-iter-{iteration}"


def publish_report(store: ArtifactStore, run: str, iteration: int) -> dict[str, Any]:
    """Build the iteration's report and show it in Prefect's UI as a markdown and a table artifact."""
    records = read_records(store, run, iteration)
    report, markdown = build_report(store, run, iteration, records)
    key = artifact_key(run, iteration)
    create_markdown_artifact(key=f"{key}-report", markdown=markdown, description=f"{run} iteration {iteration}")
    create_table_artifact(key=f"{key}-stages", table=summary_rows(records), description=f"{run} iteration {iteration}")
    return report


report_task = task(publish_report, name="report", cache_policy=NONE)
