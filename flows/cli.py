"""The `hubert-pipeline` command.

Only the standard library is imported here at start: each command imports what it needs when it
runs, so `--help` and a mistyped command answer at once instead of after loading s3fs, torch and
Prefect (about a second).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM
TERMINATION_GRACE_SECONDS = 20.0
"""How long a run stopped by SIGTERM may take to give back its lease and stop its cluster and temporary
Prefect server before it exits regardless (a scheduler's grace period is often 30 s)."""


class RunTerminated(BaseException):
    """SIGTERM reached `run` (a `timeout`, a Slurm time limit, `kill`): like Ctrl-C, not an error of the run."""


def _on_sigterm(signum: int, frame: object) -> None:
    """Stop the run where it is: Prefect marks its runs crashed and hands the signal on to this
    handler, which unwinds the flow (lease given back, cluster closed); a watchdog makes sure the
    process is gone within the grace period even if something hangs on the way out."""
    watchdog = threading.Timer(TERMINATION_GRACE_SECONDS, _exit_now)
    watchdog.daemon = True
    watchdog.start()
    raise RunTerminated


def _exit_now() -> None:
    _stop_temporary_prefect_server()
    logging.shutdown()
    os._exit(EXIT_TERMINATED)


def _stop_temporary_prefect_server() -> None:
    """Stop the Prefect server this process started for itself, if any (it would outlive a process
    that does not exit normally: Prefect stops it at interpreter exit only)."""
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()


class UsageError(Exception):
    """A command's arguments cannot be used: printed, exit status 2."""


def _load_config(path: str):
    """The validated config at `path`; UsageError naming every invalid field."""
    from tasks.run.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as error:
        raise UsageError(str(error)) from None


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """How to open a run's store for a command that reads it: `--storage-options JSON`, or the
    options and credentials of the run config at `--config PATH` (its Secret block read through
    Prefect when it names one); None for the environment's."""
    if args.storage_options is not None and args.config is not None:
        raise UsageError("give --storage-options or --config, not both")
    if args.storage_options is not None:
        try:
            options = json.loads(args.storage_options)
        except ValueError as error:
            raise UsageError(f"--storage-options is not JSON: {error}") from None
        if not isinstance(options, dict):
            raise UsageError(f"--storage-options must be a JSON object, got {type(options).__name__}")
        return options
    if args.config is not None:
        config = _load_config(args.config)
        if config.storage_credentials_block is not None:
            from flows.pretrain import with_stored_credentials

            config = with_stored_credentials(config)
        return config.fsspec_options
    return None


def _add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    found = parser.add_mutually_exclusive_group()
    found.add_argument(
        "--storage-options", metavar="JSON",
        help='fsspec options for an s3:// run, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:8333"}}\' '
        "(default: credentials from the environment or ~/.aws)",
    )
    found.add_argument("--config", metavar="PATH", help="take the storage options and credentials of this run config")



def _refused_because_held(config: Any) -> str | None:
    """Who is writing this run, if anyone: read from its lease before the preflight, Prefect, Dask
    or torch start, so a second writer is refused in a second or two (the flow takes the lease
    itself; this only answers early)."""
    from infra.lease import live_holder
    from infra.store import ArtifactStore
    from tasks.run.layout import RunLayout

    try:
        holder = live_holder(ArtifactStore(config.store, config.fsspec_options), RunLayout(config.run).lease)
    except Exception:  # noqa: BLE001 - a store that cannot be read is the preflight's to report
        return None
    return None if holder is None else f"the run is being written by another process: {holder.describe()}"


def command_run(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    if not args.wait and (held := _refused_because_held(config)):
        print(f"run refused: {held}\nrun it again when that one has finished, or add --wait.", file=sys.stderr)
        return EXIT_BUSY
    from pydantic import ValidationError

    from tasks.run.config import ConfigError
    from tasks.run.preflight import input_problems

    if problems := input_problems(config):
        print(f"invalid configuration in {args.config}:\n  " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server's 20 s default is too short on a busy machine (the run then fails before it starts).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.exceptions import TerminationSignal

    from flows.pretrain import pretrain
    from infra.lease import LeaseCorrupt, LeaseHeld, LeaseLost
    from tasks.run.plan import StopPoint, plan, stages_from

    try:
        stop = StopPoint.parse(args.until) if args.until else None
        force = StopPoint.parse(args.force) if args.force else None
        plan(config, stop)
        if force is not None:
            stages_from(config, force)
    except (ValidationError, ValueError) as error:
        print(f"--until/--force: {error}", file=sys.stderr)
        return EXIT_USAGE
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # Validated above, for any iteration (the run form's menu lists the first nine only).
        run_path = pretrain.with_options(validate_parameters=False)(
            config, stop and stop.label(), force and force.label(), wait_for_lease=args.wait
        )
    except (RunTerminated, TerminationSignal):
        print("\nrun stopped by SIGTERM; finished stages and parts are kept: run the same command again to resume.", file=sys.stderr)
        _stop_temporary_prefect_server()
        return EXIT_TERMINATED
    except ConfigError as error:
        print(f"\n{error}", file=sys.stderr)
        return EXIT_USAGE
    except LeaseHeld as error:
        print(f"\nrun refused: {error}\nrun it again when that one has finished, or add --wait.", file=sys.stderr)
        return EXIT_BUSY
    except LeaseCorrupt as error:
        print(f"\nrun refused: {error}", file=sys.stderr)
        return EXIT_BUSY
    except LeaseLost as error:
        print(
            f"\nrun stopped: {error}\nthis run lost its lease and wrote nothing more after that; another run may hold "
            "the lease and be writing this run now (`inspect` shows what is committed).",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except Exception as error:  # noqa: BLE001 - Prefect has logged the traceback; say what to do
        print(
            f"\nrun failed: {type(error).__name__}: {error}\n"
            f"finished stages and parts are kept; run the same command again to resume.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _print_inspection(run_path, config.fsspec_options)
    return 0


def _console():
    """Rich's console, wide enough for the run table even when the output is not a terminal."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def _print_inspection(run_path: str, storage_options: dict | None = None) -> None:
    from infra.commit import open_run
    from tasks.audit.inspection import inspect_run, render_table
    from tasks.run.layout import RunLayout

    console = _console()
    status = inspect_run(run_path, storage_options)
    console.print(render_table(status))
    console.print(f"artifacts: {run_path}")
    store, run = open_run(run_path, storage_options)
    for number in range(1, len(status.iterations) + 1):
        console.print(f"iteration {number} report: {store.url(RunLayout(run).report_md(number))}")
    for verdict in status.verdicts:
        if verdict is not None and verdict["verdict"] in ("worse", "unchanged"):
            console.print(f"[bold red]warning:[/] {verdict['summary']}: the labels did not improve")


def command_inspect(args: argparse.Namespace) -> int:
    from tasks.audit.inspection import inspect_run, render_table

    try:
        status = inspect_run(args.run_path, _storage_options(args))
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(status.as_json(), indent=2))
    else:
        _console().print(render_table(status))
    return 0


def command_verify(args: argparse.Namespace) -> int:
    from tasks.audit.verification import verify_run

    try:
        checks = verify_run(args.run_path, deep=args.deep, storage_options=_storage_options(args))
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    for check in checks:
        what = "outputs and digest" if check.digest_checked else "outputs"
        if check.ok:
            print(f"{check.stage}: ok ({what})")
        for problem in check.problems:
            print(f"{check.stage}: {problem}")
    failed = [check.stage for check in checks if not check.ok]
    if not checks:
        print(f"{args.run_path}: no committed stage to verify")
    elif failed:
        print(f"{len(failed)} of {len(checks)} committed stage(s) differ from their records: {', '.join(failed)}")
        return EXIT_FAILED
    return 0


def command_diff(args: argparse.Namespace) -> int:
    from rich.table import Table

    from tasks.audit.diff import diff_iterations, diff_runs

    options = _storage_options(args)
    try:
        if args.iterations:
            result = diff_iterations(args.run_a, *args.iterations, storage_options=options)
        elif args.run_b:
            result = diff_runs(args.run_a, args.run_b, storage_options=options)
        else:
            print("diff needs RUN_B or --iterations I J", file=sys.stderr)
            return EXIT_USAGE
    except (FileNotFoundError, ValueError) as error:  # no such run, or no such iteration in it
        print(f"diff: {error}", file=sys.stderr)
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
    from infra.commit import open_run, read_record
    from tasks.products import ExportError
    from tasks.products.fairseq import export_fairseq_labels
    from tasks.run.layout import RunLayout
    from tasks.run.records import RunRecords, stale_stages

    store, run = open_run(args.run_path, _storage_options(args))
    layout = RunLayout(run)
    if read_record(store, layout.scope(args.iteration), "labels") is None:
        print(f"no committed labels for iteration {args.iteration} in {args.run_path}", file=sys.stderr)
        return EXIT_USAGE
    if (stale := stale_stages(RunRecords(store, layout), "labels", args.iteration)) and not args.allow_stale:
        print(
            f"the labels of iteration {args.iteration} are stale: {'; '.join(stale)}. Run the pipeline again to bring "
            "them up to date, or add --allow-stale to export them as they are",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        splits = export_fairseq_labels(store, layout, args.iteration, Path(args.out))
    except ExportError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    for split in splits:
        print(f"wrote {split.tsv} and {split.km} ({split.utterances} utterances)")
    print(f"wrote {Path(args.out) / 'dict.km.txt'}")
    return 0


def command_export(args: argparse.Namespace) -> int:
    from infra.commit import open_run
    from tasks.products import ExportError
    from tasks.products.export import export_model
    from tasks.run.layout import RunLayout
    from tasks.run.records import RunRecords

    store, run = open_run(args.run_path, _storage_options(args))
    records = RunRecords(store, RunLayout(run))
    weights = args.weights or records.weights_chosen_for_next(args.iteration)
    try:
        summary = export_model(store, RunLayout(run), args.iteration, Path(args.out), weights, overwrite=args.overwrite)
    except ExportError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    chosen = "" if args.weights else " (the weights the next iteration takes; --weights best|final for the other)"
    print(f"wrote iteration {args.iteration}'s {weights} weights ({summary.manifest.weights_digest[:12]}){chosen} to {summary.folder}")
    print("  Hugging Face: transformers.HubertModel.from_pretrained(folder); torchaudio: torchaudio_encoder.pt")
    if (quantizer := summary.quantizer) is not None:
        print(f"  quantizer: layer {quantizer.layer}, k={quantizer.k} (fitted in iteration {quantizer.fitted_in.iteration})")
    elif (taken := records.weights_taken_next(args.iteration)) and weights not in taken:
        print(
            f"  no quantizer for the {weights} weights: iteration {args.iteration + 1} clustered a layer of the {taken[0]} "
            f"weights; export those with --weights {taken[0]} to get the quantizer too"
        )
    else:
        print("  no quantizer: no later iteration of this run clustered a layer of these weights")
    return 0


def command_units(args: argparse.Namespace) -> int:
    from tasks.corpus.manifest import ManifestError
    from tasks.products.bundle import BundleError, load_bundle
    from tasks.products.units import units

    try:
        bundle = load_bundle(args.bundle)  # every digest checked before any work
        summary = units(bundle, args.source, args.out, dedup=args.dedup, dask_address=args.dask)
    except (BundleError, ManifestError) as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    print(
        f"{summary['utterances']} utterance(s), {summary['frames']} units, {summary['rejected']} file(s) rejected; "
        f"{args.out}/units.jsonl, units.zarr, report.json"
    )
    return 0


def command_lease_break(args: argparse.Namespace) -> int:
    from infra.commit import open_run
    from infra.lease import LeaseHeld, break_lease
    from tasks.run.layout import RunLayout

    store, run = open_run(args.run_path)
    try:
        print(break_lease(store, RunLayout(run).lease, args.watch))
    except LeaseHeld as error:
        print(f"lease not broken: {error}; it was renewed while it was watched", file=sys.stderr)
        return EXIT_BUSY
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


class _PrintVersion(argparse.Action):
    """`--version`: the package version and the checkout's commit, as records note them (read only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from infra.version import code_version

        print(f"hubert-pipeline {code_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hubert-pipeline", description="HuBERT self-supervised speech pretraining: run, audit and export runs."
    )
    parser.add_argument("--version", action=_PrintVersion, help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run or resume a pretraining run from a YAML config")
    run.add_argument("config", help="YAML config (see configs/demo.yaml)")
    run.add_argument(
        "--until", metavar="STAGE[@ITER]",
        help="stop after this stage (intake, features, kmeans, labels, train, profile) of this iteration (default 1)",
    )
    run.add_argument(
        "--force", metavar="STAGE[@ITER]", help="re-run this stage and everything after it, even if committed"
    )
    run.add_argument(
        "--wait", action="store_true",
        help="if another process is writing this run, wait for it (or for its lease to expire) instead of refusing",
    )
    run.set_defaults(handler=command_run)

    inspect = commands.add_parser("inspect", help="show what each stage of a run has committed")
    inspect.add_argument("run_path", help="<store>/<run>, a local folder or s3:// URL")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    _add_storage_arguments(inspect)
    inspect.set_defaults(handler=command_inspect)

    verify = commands.add_parser("verify", help="check every committed stage's outputs against its record")
    verify.add_argument("run_path", help="<store>/<run>, a local folder or s3:// URL")
    verify.add_argument("--deep", action="store_true", help="also recompute every output digest from the stored outputs")
    _add_storage_arguments(verify)
    verify.set_defaults(handler=command_verify)

    diff = commands.add_parser("diff", help="which stages of two runs (or two iterations) differ, and why")
    diff.add_argument("run_a", help="<store>/<run>")
    diff.add_argument("run_b", nargs="?", help="another <store>/<run>")
    diff.add_argument("--iterations", nargs=2, type=int, metavar=("I", "J"), help="compare two iterations of run_a")
    diff.add_argument("--json", action="store_true")
    _add_storage_arguments(diff)
    diff.set_defaults(handler=command_diff)

    labels = commands.add_parser(
        "export-labels", help="write an iteration's labels for fairseq: train.tsv + train.km (valid.*), dict.km.txt"
    )
    labels.add_argument("run_path", help="<store>/<run>")
    labels.add_argument("--iteration", type=int, default=1)
    labels.add_argument("--out", required=True, help="output folder")
    labels.add_argument(
        "--allow-stale", action="store_true", help="export labels whose inputs changed since they were made (refused by default)"
    )
    _add_storage_arguments(labels)
    labels.set_defaults(handler=command_export_labels)

    export = commands.add_parser(
        "export", help="write an iteration's trained encoder (Hugging Face + torchaudio) and its quantizer to a folder"
    )
    export.add_argument("run_path", help="<store>/<run>, a local folder or s3:// URL")
    export.add_argument("--iteration", type=int, required=True, help="the iteration whose trained model to export")
    export.add_argument(
        "--weights", choices=("final", "best"),
        help="which checkpoint (default: the one the next iteration takes, train.weights_for_next)",
    )
    export.add_argument("--out", required=True, help="output folder (the bundle that `units` reads); refused if not empty")
    export.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty, replacing the bundle's files")
    _add_storage_arguments(export)
    export.set_defaults(handler=command_export)

    unit = commands.add_parser("units", help="turn any corpus into discrete units with an exported bundle")
    unit.add_argument("bundle", help="a folder written by `hubert-pipeline export` (with a quantizer/)")
    unit.add_argument("source", help="a folder of wav/flac, a fairseq .tsv or a NeMo .jsonl; local or s3://")
    unit.add_argument("--out", required=True, help="output folder: units.jsonl, units.zarr, report.json")
    unit.add_argument("--dedup", action="store_true", help="collapse repeated units; units.jsonl gets their durations")
    unit.add_argument("--dask", metavar="ADDRESS", help="scheduler address (default: a LocalCluster)")
    unit.set_defaults(handler=command_units)

    lease = commands.add_parser("lease", help="the run's lease (its one writer)")
    lease_commands = lease.add_subparsers(dest="lease_command", required=True)
    breaking = lease_commands.add_parser(
        "break",
        help="remove a run's lease that no live process holds (unreadable, or left by a lost machine or a wrong clock); "
        "refused when it is renewed while watched",
    )
    breaking.add_argument("run_path", help="<store>/<run>, a local folder or s3:// URL")
    breaking.add_argument(
        "--watch", type=float, metavar="SECONDS",
        help="how long to watch for a renewal first (default: 1.5 renewal periods of the lease's TTL)",
    )
    breaking.set_defaults(handler=command_lease_break)

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
    for package in ("tasks", "infra", "flows", "model"):
        logging.getLogger(package).setLevel(logging.INFO)
    try:
        return args.handler(args)
    except UsageError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:
        if getattr(args, "run_path", None) is None or not _store_refused(error):
            raise
        print(
            f"{args.command}: cannot read {args.run_path}: {type(error).__name__}: {error}\n"
            "for a run on S3, give --storage-options JSON or --config PATH (its run config), or credentials in the environment",
            file=sys.stderr,
        )
        return EXIT_USAGE


def _store_refused(error: Exception) -> bool:
    """An error of the store itself (no or wrong credentials, refused, unreachable), not of our code."""
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(error, (OSError, BotoCoreError, ClientError))


def console_main() -> None:
    """The `hubert-pipeline` command: `main`, then exit with its code, the heap frozen first so
    that the interpreter's exit skips collecting what torch, Prefect and Dask built at import
    (half a second a command)."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console_main()
