"""The `hubert-pipeline` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from infra.paths import path_exists
from tasks.config import ConfigError, PretrainConfig, load_config

EXIT_FAILED = 1
EXIT_USAGE = 2


def preflight(config: PretrainConfig) -> list[str]:
    """Problems that would only surface mid-run, found before anything starts."""
    problems = []
    if not path_exists(config.corpus.source, config.storage_options):
        problems.append(f"corpus.source: {config.corpus.source} does not exist")
    if config.corpus.alignments is not None and not path_exists(config.corpus.alignments, config.storage_options):
        problems.append(f"corpus.alignments: {config.corpus.alignments} does not exist")
    valid = config.corpus.valid
    if isinstance(valid, str) and not path_exists(valid, config.storage_options):
        problems.append(f"corpus.valid: the listing of validation ids {valid} does not exist")
    return problems


def command_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    if problems := preflight(config):
        print(f"invalid configuration in {args.config}:\n  " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_USAGE
    # Our modules' log lines belong in Prefect's run logs too; must be set before Prefect loads.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,infra,flows")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.pretrain import StopPoint, check_stop_point, pretrain

    try:
        stop = StopPoint.parse(args.until) if args.until else StopPoint()
        force = StopPoint.parse(args.force) if args.force else None
        check_stop_point(stop, config)
    except (ValidationError, ValueError) as error:
        print(f"--until/--force: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        run_path = pretrain(config, stop, force)
    except Exception as error:  # noqa: BLE001 - Prefect has logged the traceback; say what to do
        print(
            f"\nrun failed: {type(error).__name__}: {error}\n"
            f"finished stages and parts are kept; run the same command again to resume.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    _print_inspection(run_path, config.storage_options)
    return 0


def _console() -> Console:
    """Rich's console, wide enough for the run table even when the output is not a terminal."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def _print_inspection(run_path: str, storage_options: dict | None = None) -> None:
    from flows.inspection import inspect_run, render_table

    from infra.store import open_run
    from tasks.layout import RunLayout

    console = _console()
    status = inspect_run(run_path, storage_options)
    console.print(render_table(status))
    console.print(f"artifacts: {run_path}")
    store, run = open_run(run_path, storage_options)
    for number in range(1, len(status.iterations) + 1):
        console.print(f"iteration {number} report: {store.url(RunLayout(run).report_md(number))}")


def command_inspect(args: argparse.Namespace) -> int:
    from flows.inspection import inspect_run, render_table

    try:
        status = inspect_run(args.run_path)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(status.as_json(), indent=2))
    else:
        _console().print(render_table(status))
    return 0


def command_diff(args: argparse.Namespace) -> int:
    from rich.table import Table

    from flows.diff import diff_iterations, diff_runs

    if args.iterations:
        result = diff_iterations(args.run_a, *args.iterations)
    elif args.run_b:
        result = diff_runs(args.run_a, args.run_b)
    else:
        print("diff needs RUN_B or --iterations I J", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps({scope: [row.__dict__ for row in rows] for scope, rows in result.items()}, indent=2))
        return 0
    table = Table(title="stage differences")
    for column in ("scope", "stage", "verdict", "why"):
        table.add_column(column)
    for scope, rows in result.items():
        for row in rows:
            table.add_row(scope, row.stage, row.verdict, row.detail)
    _console().print(table)
    return 0


def command_export_labels(args: argparse.Namespace) -> int:
    from infra.store import open_run, read_record
    from tasks.exports import export_fairseq_labels
    from tasks.layout import RunLayout

    store, run = open_run(args.run_path)
    layout = RunLayout(run)
    if read_record(store, layout.scope(args.iteration), "labels") is None:
        print(f"no committed labels for iteration {args.iteration} in {args.run_path}", file=sys.stderr)
        return EXIT_USAGE
    target = export_fairseq_labels(store, layout, args.iteration, Path(args.out), args.split)
    print(f"wrote {target} and {target.parent / 'dict.km.txt'}")
    return 0


def command_dev_s3(args: argparse.Namespace) -> int:
    from devtools.seaweed import main as serve_s3

    argv = ["--port", str(args.port), "--bucket", args.bucket]
    if args.dir is not None:
        argv += ["--dir", args.dir]
    return serve_s3(argv)


def command_demo_corpus(args: argparse.Namespace) -> int:
    from devtools.demo_corpus import synthesize_demo_corpus

    try:
        summary = synthesize_demo_corpus(Path(args.out), minutes=args.minutes, seed=args.seed)
    except FileExistsError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    print(
        f"demo corpus: {summary.utterances} utterances, {summary.speakers} speakers, "
        f"{summary.seconds / 60:.1f} min in {summary.out_dir}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubert-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run or resume a pretraining run from a YAML config")
    run.add_argument("config", help="YAML config (see configs/demo.yaml)")
    run.add_argument(
        "--until", metavar="STAGE[@ITER]",
        help="stop after this stage (intake, features, kmeans, labels, train) of this iteration (default 1)",
    )
    run.add_argument(
        "--force", metavar="STAGE[@ITER]", help="re-run this stage and everything after it, even if committed"
    )
    run.set_defaults(handler=command_run)

    inspect = commands.add_parser("inspect", help="show what each stage of a run has committed")
    inspect.add_argument("run_path", help="<store>/<run>, a local folder or s3:// URL")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(handler=command_inspect)

    diff = commands.add_parser("diff", help="which stages of two runs (or two iterations) differ, and why")
    diff.add_argument("run_a", help="<store>/<run>")
    diff.add_argument("run_b", nargs="?", help="another <store>/<run>")
    diff.add_argument("--iterations", nargs=2, type=int, metavar=("I", "J"), help="compare two iterations of run_a")
    diff.add_argument("--json", action="store_true")
    diff.set_defaults(handler=command_diff)

    export = commands.add_parser("export-labels", help="write an iteration's labels in fairseq's .km format")
    export.add_argument("run_path", help="<store>/<run>")
    export.add_argument("--iteration", type=int, default=1)
    export.add_argument("--split", default="train", help="file name: <split>.km (default train)")
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(handler=command_export_labels)

    dev = commands.add_parser("dev", help="local services for trying things out")
    services = dev.add_subparsers(dest="service", required=True)
    s3 = services.add_parser("s3", help="run a local SeaweedFS S3 server until Ctrl-C and print how to use it")
    s3.add_argument("--dir", help="data folder, kept (default: a temporary one, removed on exit)")
    s3.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1 (default 8333)")
    s3.add_argument("--bucket", default="hubert", help="bucket to create (default hubert)")
    s3.set_defaults(handler=command_dev_s3)

    demo = commands.add_parser("demo-corpus", help="synthesize an English demo corpus with phone alignments")
    demo.add_argument("out", help="output folder (wav/, align/, manifest.jsonl)")
    demo.add_argument("--minutes", type=float, default=10.0, help="minutes of audio (default 10)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (same seed, same corpus)")
    demo.set_defaults(handler=command_demo_corpus)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Dask reads its logging config when first imported, in this process and in its workers.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for package in ("tasks", "infra", "flows"):
        logging.getLogger(package).setLevel(logging.INFO)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
