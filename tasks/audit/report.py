"""An iteration's audit report, from its stage records alone (not a stage: nothing reads it).

    iter-N/report.json   what ran, when, on what (config and input digests), counts, sizes, metrics
    iter-N/report.md     the same for people, with plots:
    iter-N/plots/*.png   training loss and accuracy, cluster sizes, cluster quality across iterations

The report is rebuilt whenever it is asked for (cheap); it never feeds another stage.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure

from infra.commit import StageRecord
from tasks.run.layout import StageName
from tasks.run.records import RunRecords
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
    figure = Figure(figsize=(12, 3.4))
    axes = figure.subplots(1, len(PROFILE_MEASURES))
    for axis, measure in zip(axes, PROFILE_MEASURES):
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


def build_report(run: RunRecords, iteration: int) -> tuple[dict[str, Any], str]:
    """Write iter-N/report.json, report.md and plots from the iteration's records; returns the
    report and its markdown."""
    store, layout = run.store, run.layout
    records = run.iteration(iteration)
    plots: dict[str, str] = {}

    def add_plot(name: str, png: bytes) -> None:
        store.write_bytes(layout.plot(iteration, name), png)
        plots[name] = layout.plot_in_report(name)

    if "train" in records and (curve := store.read_json(layout.train_log(iteration)) or []):
        add_plot("training", training_plot(curve))
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
    verdict = iteration_verdict(iteration, records.get("labels"), previous_labels, records.get("reference"))

    report = {
        "run": layout.run,
        "iteration": iteration,
        "stages": {name: record.model_dump(mode="json") for name, record in records.items()},
        "lineage": {
            name: {"key": record.key, "config_digest": record.config_digest, "inputs": record.inputs, "output": record.output_digest}
            for name, record in records.items()
        },
        "plots": plots,
        "verdict": None if verdict is None else {**verdict.as_json(), "summary": verdict.sentence()},
        "layer_profile": profiles.get(iteration),
        "probes": {str(n): measured for n, measured in so_far("probe").items()},
    }
    markdown = render_markdown(report, records)
    store.write_json(layout.report_json(iteration), report)
    store.write_text(layout.report_md(iteration), markdown)
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
            "key metrics": STAGES[name].summary(record),
        }
        for name, record in records.items()
    ]


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
    if report["verdict"] is not None:
        warning = " **(a regression: these labels are not better than the last iteration's)**" if report["verdict"]["verdict"] in ("worse", "unchanged") else ""
        lines += ["", "## Verdict", "", report["verdict"]["summary"] + warning]
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
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in report["plots"].items()]
    return "\n".join(lines) + "\n"


def _measure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
