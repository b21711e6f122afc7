"""An iteration's audit report, from its stage records alone (not a stage: nothing reads it).

    iter-N/report.json   what ran, when, on what (config and input digests), counts, sizes, metrics
    iter-N/report.md     the same for people, with plots:
    iter-N/plots/*.png   training loss and accuracy, validation curve, cluster sizes, cluster quality across iterations

Prefect's UI gets the same report with its plots inline (`standalone_markdown`), and the
intake's rejections as a table (`intake_rows`).

The report is rebuilt whenever it is asked for (cheap); it never feeds another stage.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from infra.commit import StageRecord
from tasks.run.layout import StageName
from tasks.run.records import RunRecords
from tasks.run.stage import record_seconds
from tasks.stages.catalog import STAGES
from tasks.stages.reference.verdict import iteration_verdict


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


def quality_plot(labels: dict[int, StageRecord], references: dict[int, dict[str, Any]]) -> bytes:
    """PNMI per iteration: each iteration's labels as points of their own k (a line joins only
    equal k: PNMI rises with k by itself), and each equal-k reference beside the labels it judges."""
    figure = Figure(figsize=(6.5, 3.4))
    axis = figure.subplots()
    by_k: dict[int, list[tuple[int, float]]] = {}
    for iteration, record in sorted(labels.items()):
        by_k.setdefault(int(record.counts["k"]), []).append((iteration, record.metrics["quality"]["pnmi"]))
    for k, points in sorted(by_k.items()):
        axis.plot(*zip(*points), marker="o", label=f"labels, k={k}")
    for iteration, measured in sorted(references.items()):
        described = measured["describes"]
        axis.plot([iteration - 0.1, iteration + 0.1], [measured["reference"]["pnmi"], measured["labels"]["pnmi"]],
                  color="grey", linestyle=":", marker="x")
        axis.annotate(f"iteration {described['iteration']}'s features at k={described['k']}", (iteration - 0.1, measured["reference"]["pnmi"]),
                      fontsize="x-small", textcoords="offset points", xytext=(4, -10))
    iterations = sorted(labels)
    axis.set(title="PNMI across iterations (compare only at equal k)", xlabel="iteration", ylabel="PNMI", xticks=iterations)
    axis.legend(fontsize="small")
    return _png(figure)


PROFILE_MEASURES = ("pnmi", "phone_purity", "speaker_probe_accuracy")


def layer_profile_plot(profiles: dict[int, dict[str, Any]]) -> bytes:
    """Layer x measure, one line per iteration (MFCC on the same sample as a dashed reference)."""
    measured = [
        measure for measure in PROFILE_MEASURES
        if any(row.get(measure) is not None for profile in profiles.values() for row in profile["layers"])
    ] or ["pnmi"]
    figure = Figure(figsize=(4 * len(measured), 3.4))
    axes = figure.subplots(1, len(measured), squeeze=False)[0]
    for axis, measure in zip(axes, measured):
        for iteration, profile in sorted(profiles.items()):
            points = [(row["layer"], row[measure]) for row in profile["layers"] if row.get(measure) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=f"iteration {iteration} (k={profile['k']})")
            reference = profile["mfcc"].get(measure)
            if reference is not None and iteration == min(profiles):
                axis.axhline(reference, linestyle="--", color="grey", label="MFCC")
        axis.set(title=measure.replace("_", " "), xlabel="transformer layer")
        axis.legend(fontsize="small")
    return _png(figure)


def validation_plot(curve: list[list[float]]) -> bytes:
    """Validation loss and masked accuracy per validation pass (train's `valid_curve`)."""
    figure = Figure(figsize=(9, 3.2))
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    steps = [row[0] for row in curve]
    loss_axis.plot(steps, [row[1] for row in curve], marker="o")
    loss_axis.set(title="validation loss", xlabel="step", ylabel="cross-entropy (masked frames)")
    accuracy_axis.plot(steps, [row[2] for row in curve], marker="o")
    accuracy_axis.set(title="validation masked accuracy", xlabel="step")
    return _png(figure)


@dataclass(frozen=True)
class BuiltReport:
    """An iteration's report: `report` (report.json), `markdown` (report.md, plots linked
    beside it), the plots' PNG bytes by name, and the verdict in one line."""

    report: dict[str, Any]
    markdown: str
    plots: dict[str, bytes]
    verdict_line: str


def weights_used(run: RunRecords, iteration: int) -> str | None:
    """Which weights of iteration N-1 this iteration's features were computed from ('best',
    'final', or 'best = final'); None for MFCC features."""
    return " = ".join(run.weights_taken_next(iteration - 1)) or None if iteration > 1 else None


def iteration_settings(run: RunRecords, iteration: int, weights_for_next: str | None) -> list[tuple[str, str]]:
    """(setting, value) rows a reader needs to judge the iteration: what was clustered (the layer
    and why), k, the training, and which weights went in and on."""
    records = run.iteration(iteration)
    rows: list[tuple[str, str]] = []
    if (features := records.get("features")) is not None:
        source = features.config.get("source", {})
        if features.config.get("kind") == "mfcc":
            rows.append(("features", "MFCC (39-dim, 100 frames/s)"))
        else:
            rows.append(("features", f"layer {source.get('layer')} of iteration {iteration - 1}'s model"))
            if (why := features.metrics.get("layer_choice")) is not None:
                rows.append(("layer chosen by", str(why)))
            if (used := weights_used(run, iteration)) is not None:
                rows.append(("weights used", f"iteration {iteration - 1}'s {used} (`{source.get('model_digest', '')[:12]}`)"))
    if (kmeans := records.get("kmeans")) is not None:
        config = kmeans.config
        rows.append(("k-means", f"k={config.get('k')}, sample_fraction {config.get('sample_fraction')}, {kmeans.counts.get('frames_fitted')} frames fitted"))
    if (train := records.get("train")) is not None:
        config = train.config
        rows.append(("training", f"{config.get('model')} model, {train.counts.get('steps')} of {config.get('steps')} steps, learning rate {config.get('learning_rate')}"))
        if "best_step" in train.metrics:
            rows.append(("best weights", f"step {train.metrics['best_step']} (validation loss {train.metrics['best_valid_loss']:.3f})"))
    if weights_for_next is not None:
        rows.append(("weights for the next iteration", weights_for_next))
    return rows


def build_report(run: RunRecords, iteration: int, weights_for_next: str | None = None) -> BuiltReport:
    """Write iter-N/report.json, report.md and plots from the iteration's records.

    `weights_for_next` (the config's `train.weights_for_next`, resolved) is shown among the
    settings when given; the records alone do not hold it."""
    store, layout = run.store, run.layout
    records = run.iteration(iteration)
    plots: dict[str, str] = {}
    images: dict[str, bytes] = {}

    def add_plot(name: str, png: bytes) -> None:
        store.write_bytes(layout.plot(iteration, name), png)
        plots[name] = layout.plot_in_report(name)
        images[name] = png

    if "train" in records and (curve := store.read_json(layout.train_log(iteration)) or []):
        add_plot("training", training_plot(curve))
    if "train" in records and (valid_curve := records["train"].metrics.get("valid_curve")):
        add_plot("validation", validation_plot(valid_curve))
    if "kmeans" in records and (fit := store.read_json(layout.fit_report(iteration))):
        add_plot("cluster_sizes", cluster_size_plot(fit["cluster_sizes"]))

    def so_far(stage: StageName, metric: str | None = None) -> dict[int, Any]:
        """`metric` of `stage`'s record (all its metrics: None) in this iteration and every earlier one that has it."""
        found = {}
        for earlier in range(1, iteration + 1):
            record = run.get(stage, earlier)
            if record is not None and (metric is None or record.metrics.get(metric)):
                found[earlier] = record.metrics if metric is None else record.metrics[metric]
        return found

    labelled = {n: record for n in range(1, iteration + 1) if (record := run.get("labels", n)) is not None and record.metrics.get("quality")}
    if labelled:
        add_plot("quality", quality_plot(labelled, so_far("reference")))
    if profiles := so_far("profile"):
        add_plot("layer_profile", layer_profile_plot(profiles))
    previous_labels = run.get("labels", iteration - 1) if iteration > 1 else None
    verdict = iteration_verdict(
        iteration, records.get("labels"), previous_labels, records.get("reference"),
        run.get("probe", iteration - 1) if iteration > 1 else None,
    )

    report = {
        "run": layout.run,
        "iteration": iteration,
        "settings": dict(iteration_settings(run, iteration, weights_for_next)),
        "stages": {name: record.model_dump(mode="json") for name, record in records.items()},
        "lineage": {
            name: {"key": record.key, "config_digest": record.config_digest, "inputs": record.inputs, "output": record.output_digest}
            for name, record in records.items()
        },
        "plots": plots,
        "verdict": None if verdict is None else {**verdict.as_json(), "summary": verdict.sentence()},
        "validation": records["train"].metrics.get("valid_curve") if "train" in records else None,
        "layer_profile": profiles.get(iteration),
        "probes": {str(n): measured for n, measured in so_far("probe").items()},
    }
    markdown = render_markdown(report, records)
    store.write_json(layout.report_json(iteration), report)
    store.write_text(layout.report_md(iteration), markdown)
    verdict_line = report["verdict"]["summary"] if report["verdict"] is not None else "no verdict yet (its labels are not committed)"
    return BuiltReport(report, markdown, images, verdict_line)


def standalone_markdown(built: BuiltReport) -> str:
    """The report's markdown with its plots inline (PNG data URIs), for a reader that has no store
    beside it: Prefect's UI shows `plots/*.png` links as broken images."""
    inline = {name: "data:image/png;base64," + base64.b64encode(png).decode() for name, png in built.plots.items()}
    return render_markdown(built.report, None, images=inline)


def summary_rows(records: dict[str, StageRecord]) -> list[dict[str, Any]]:
    """One row per committed stage, for Prefect's table artifact: its key metrics first and the
    rest short, so that the UI's table (one line a cell) cuts nothing off; times and digests are
    in the report."""
    return [
        {
            "stage": name,
            "key metrics": STAGES[name].summary(record),
            "seconds": round(record_seconds(record), 1),
            "MiB": round(sum(record.sizes.values()) / 2**20, 1),
        }
        for name, record in records.items()
    ]


def intake_rows(run: RunRecords) -> tuple[list[dict[str, str]], str]:
    """The files intake rejected (file, reason, detail, path), and a one-line description."""
    record = run.get("intake", None)
    report = run.store.read_json(run.layout.intake_report) or {}
    rows = [
        {"file": rejection["id"], "reason": rejection["reason"], "detail": rejection["detail"], "path": rejection["path"]}
        for rejection in report.get("rejected", [])
    ]
    accepted = "intake not committed" if record is None else STAGES["intake"].summary(record)
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(report.get("rejected_by_reason", {}).items()))
    return rows, f"{run.layout.run} intake: {accepted}" + (f" ({reasons})" if reasons else "; no file rejected")


def render_markdown(report: dict[str, Any], records: dict[str, StageRecord] | None, images: dict[str, str] | None = None) -> str:
    """The report for people. Plots are linked by `images` (name -> URL; default: report.json's
    relative paths); each stage's key metrics are a list below the table, not a table cell, so
    that no viewer cuts them off."""
    lines = [f"# {report['run']}: iteration {report['iteration']}", ""]
    if report["verdict"] is not None:
        warning = " **(a regression: these labels are not better than the last iteration's)**" if report["verdict"]["verdict"] in ("worse", "unchanged") else ""
        lines += ["## Verdict", "", report["verdict"]["summary"] + warning, ""]
    if report.get("settings"):
        lines += ["## Settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in report["settings"].items()]
        lines.append("")
    stages = report["stages"]
    lines += ["## Stages", "", "| stage | finished | seconds | bytes | output digest |", "|---|---|---|---|---|"]
    for name, stage in stages.items():
        digest = stage["output_digest"][:12]
        lines.append(f"| {name} | {stage['finished_at'][:19]} | {stage['seconds']} | {sum(stage['sizes'].values())} | `{digest}` |")
    lines += ["", "What each stage committed:", ""]
    for name, stage in stages.items():
        summary = STAGES[name].summary(records[name] if records is not None else StageRecord.model_validate(stage))
        lines.append(f"- **{name}**: {summary}")
    if report.get("validation"):
        lines += ["", "## Validation", "", "| step | validation loss | masked accuracy |", "|---|---|---|"]
        lines += [f"| {int(step)} | {loss:.4f} | {accuracy:.4f} |" for step, loss, accuracy in report["validation"]]
    lines += ["", "## Lineage", "", "Each stage's key, and the digests of the inputs it was made from:", ""]
    for name, lineage in report["lineage"].items():
        inputs = ", ".join(f"{k} `{v[:12]}`" for k, v in lineage["inputs"].items()) or "none"
        lines.append(f"- **{name}** `{lineage['key'][:12]}`: {inputs}")
    if report["layer_profile"]:
        profile = report["layer_profile"]
        lines += [
            "", f"## Layer profile (k={profile['k']}, {profile['utterances']} utterances; best layer: {profile['best_layer']})", "",
            "| layer | PNMI | phone purity | cluster purity | speaker probe accuracy |", "|---|---|---|---|---|",
        ]
        for row in [*profile["layers"], {"layer": "MFCC", **profile["mfcc"]}]:
            cells = [_measure(row.get(name)) for name in ("pnmi", "phone_purity", "cluster_purity", "speaker_probe_accuracy")]
            lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
    if report["probes"]:
        lines += [
            "", "## Downstream phone probe (frozen features, linear heads; PER on held-out validation utterances)", "",
            "| iteration | PER | MFCC PER | best layer frame accuracy | MFCC frame accuracy | minutes trained on / held out |",
            "|---|---|---|---|---|---|",
        ]
        for number, measured in report["probes"].items():
            model, mfcc = measured["model"], measured["mfcc"]
            lines.append(
                f"| {number} | {model['per']:.3f} | {mfcc['per']:.3f} | {max(model['frame_accuracy']):.3f} | "
                f"{mfcc['frame_accuracy'][0]:.3f} | {measured['train_minutes']:.1f} / {measured['test_minutes']:.1f} |"
            )
    if report["plots"]:
        links = images if images is not None else report["plots"]
        lines += ["", "## Plots", ""] + [f"![{name}]({links[name]})" for name in report["plots"]]
    return "\n".join(lines) + "\n"


def _measure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
