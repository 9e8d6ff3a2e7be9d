"""``asset-library``: ingest batches and ask the library questions from a terminal.

Exit codes, the same for every command: 0 done; 1 not found (an md5 the library does not
have) or a run that failed (planning, a shard, the refresh, a check); 2 bad arguments (an
option, a missing source, an existing --batch, a refused or invalid query) or no library at
the path; 130 interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from asset_library.ids import InvalidIdError, check_batch_id
from asset_library.layout import HOME_ENV, LibraryLayout, default_library_path, resolve_home

if TYPE_CHECKING:
    from asset_library.library import Library
from asset_library.search.thresholds import DEFAULT_CONFIRM_DISTANCE, DEFAULT_MIN_QUALITY

#: Exit codes (the module's docstring says which error gets which).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # also argparse's own, for an option it cannot parse
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):  # `asset-library` alone: what it can do
        parser.print_help()
        return 0
    try:
        if args.library:  # a home that is neither a folder nor s3://bucket[/prefix]: exit 2
            args.library = os.environ[HOME_ENV] = resolve_home(args.library)
        elif os.environ.get(HOME_ENV):
            os.environ[HOME_ENV] = resolve_home(os.environ[HOME_ENV])
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (`... | head -1`): what it read was all it wanted. Point stdout
        # at nothing so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK
    except Exception as error:
        said = _exit_code(error)
        if said is None:
            raise
        print(f"asset-library: {error}", file=sys.stderr)
        return said


def _exit_code(error: Exception) -> int | None:
    """The exit code of an error that is the user's input or the library's state, said in one
    line; ``None`` for a defect (a traceback). Imported here so that ``--help`` and ``status``
    stay quick."""
    import duckdb

    from asset_library.library import ImageNotFoundError
    from asset_library.similarity import IndexNotReady

    if isinstance(error, ImageNotFoundError):
        return EXIT_FAILED
    if isinstance(error, FileNotFoundError | ValueError | duckdb.Error | IndexNotReady):
        return EXIT_USAGE
    return None


def _library(args: argparse.Namespace) -> Library:
    from asset_library.library import Library

    return Library(args.library)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--library",
        help="the library: a folder or s3://bucket/prefix (default: $ASSET_LIBRARY_HOME or "
        "./library)",
    )
    parser = argparse.ArgumentParser(prog="asset-library", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    ingest = commands.add_parser(
        "ingest", parents=[common], help="plan a batch, ingest every shard, refresh, check"
    )
    ingest.add_argument("source", help="a folder, an s3://bucket/prefix, or a manifest file")
    ingest.add_argument("--shard-size", type=_at_least(1), help="max images per shard (at least 1)")
    ingest.add_argument(
        "--parallel",
        type=_at_least(1),
        help="shards run side by side, each its own Dagster run (default: half the cores)",
    )
    ingest.add_argument(
        "--workers",
        type=_at_least(0),
        help="fingerprinting processes per shard (default: the cores shared out among the "
        "parallel shards; 0: in the run's process)",
    )
    ingest.add_argument(
        "--retries",
        type=_at_least(0),
        help="times a failed shard is run again (default: run_retries.max_retries of the "
        "instance's dagster.yaml, else 2)",
    )
    ingest.add_argument(
        "--batch",
        type=_batch_id,
        help="batch id: letters, digits, '_', '-', '.' (default: source name, time, suffix)",
    )
    ingest.add_argument(
        "--replace",
        action="store_true",
        help="re-plan an existing --batch from this source and re-run its shards",
    )
    ingest.set_defaults(handler=_ingest)

    status = commands.add_parser("status", parents=[common], help="batches, shards, states")
    status.set_defaults(handler=_status)

    lookup = commands.add_parser("lookup", parents=[common], help="an image by md5, as JSON")
    lookup.add_argument("md5")
    lookup.set_defaults(handler=_lookup)

    similar = commands.add_parser(
        "similar", parents=[common], help="near-duplicates of an image, as JSON lines"
    )
    similar.add_argument("image", help="an image file, or the md5 of an image in the library")
    similar.add_argument("--max-distance", type=int, help="Hamming bits (default 8)")
    similar.add_argument("--limit", type=int, default=20, help="most results (default 20)")
    similar.add_argument("--hash", default="phash", choices=["phash", "dhash", "ahash"])
    similar.add_argument(
        "--transforms",
        default="none",
        choices=["none", "dihedral"],
        help="dihedral: also find copies rotated by 90/180/270 degrees or mirrored (phash)",
    )
    similar.add_argument(
        "--min-quality",
        type=int,
        default=DEFAULT_MIN_QUALITY,
        help=f"leave out results with a lower information score, 0-100 (default "
        f"{DEFAULT_MIN_QUALITY}; 0 keeps flat images)",
    )
    similar.add_argument(
        "--confirm",
        type=int,
        default=DEFAULT_CONFIRM_DISTANCE,
        help="keep a match only when a second hash (dHash; pHash for --hash dhash) is within "
        f"this many bits too (default {DEFAULT_CONFIRM_DISTANCE}; 64 keeps every match)",
    )
    similar.set_defaults(handler=_similar)

    duplicates = commands.add_parser(
        "duplicates", parents=[common], help="near-duplicate groups, one JSON line each"
    )
    duplicates.set_defaults(handler=_duplicates)

    sql = commands.add_parser(
        "sql",
        parents=[common],
        help="a query on the catalog, as CSV",
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sql.add_argument("-h", "--help", action=_HelpWithMacros)
    sql.add_argument("query", help="one read-only query: SELECT, WITH, FROM, VALUES, DESCRIBE...")
    sql.add_argument("--json", action="store_true", help="JSON lines instead of CSV")
    sql.add_argument(
        "--param", action="append", default=[], help="a bound value for ?, in order (repeatable)"
    )
    sql.set_defaults(handler=_sql)

    serve = commands.add_parser(
        "serve", parents=[common], help="the library over HTTP: a JSON API and a gallery page"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    serve.add_argument("--port", type=_at_least(0), default=8000, help="port (default 8000)")
    serve.add_argument(
        "--cache-dir", help="thumbnail cache (default: ~/.cache/asset-library/<library>)"
    )
    serve.add_argument(
        "--max-upload-mb",
        type=float,
        help="largest upload /similar accepts (default $ASSET_LIBRARY_MAX_UPLOAD_MB or 20)",
    )
    serve.add_argument(
        "--upload-workers",
        type=_at_least(1),
        default=2,
        help="images decoded at once: uploads, searches by md5, thumbnails",
    )
    serve.add_argument(
        "--decode-wait",
        type=float,
        default=10.0,
        help="seconds a request waits for a decode slot before a 503",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="a line per request (off by default: at thousands of lookups a second, formatting "
        "them is a measurable share of the cost)",
    )
    serve.set_defaults(handler=_serve)

    migrate = commands.add_parser(
        "migrate",
        parents=[common],
        help="move a library of the previous layout (lake/base, catalog.duckdb) onto Delta",
    )
    migrate.set_defaults(handler=_migrate)

    move = commands.add_parser(
        "move-to",
        parents=[common],
        help="copy a folder library to an empty s3://bucket/prefix, its new home",
    )
    move.add_argument("target", help="s3://bucket/prefix, empty")
    move.set_defaults(handler=_move_to)

    recount = commands.add_parser(
        "recount",
        parents=[common],
        help="make every image's occurrence count equal its occurrences (repairs double counts)",
    )
    recount.set_defaults(handler=_recount)
    return parser


def _version() -> str:
    """The installed distribution's version, the one ``pyproject.toml`` gives."""
    from importlib.metadata import version

    return version("asset-library")


class _HelpWithMacros(argparse.Action):
    """``sql --help``: the usual help, then the catalog's table macros with their arguments.
    The catalog is imported only here: it takes about a second to load."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show this help, with the table macros, and exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        import textwrap

        from asset_library.lake.catalog import MACRO_HELP, VIEWS, macro_signature

        lines = [
            f"  {macro_signature(name)}\n"
            + textwrap.fill(MACRO_HELP[name], 79, initial_indent=" " * 6, subsequent_indent=" " * 6)
            for name in MACRO_HELP
        ]
        parser.epilog = (
            f"views: {', '.join(VIEWS)}\n\n"
            "table macros, their arguments bound as values "
            "(SELECT * FROM image(?) --param <md5>):\n" + "\n".join(lines)
        )
        parser.print_help()
        parser.exit()


def _at_least(minimum: int) -> Any:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def _batch_id(text: str) -> str:
    try:
        return check_batch_id(text)
    except InvalidIdError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _ingest(args: argparse.Namespace) -> int:
    from asset_library.runs.orchestrate import PlanningFailed, ingest_batch
    from asset_library.runs.progress_view import ProgressView

    if args.replace and not args.batch:
        print("asset-library: --replace needs the --batch to replace", file=sys.stderr)
        return EXIT_USAGE
    library = args.library or str(default_library_path())
    view = ProgressView(sys.stdout)
    try:
        summary = ingest_batch(
            args.source,
            library=library,
            max_images_per_shard=args.shard_size,
            workers=args.workers,
            parallel=args.parallel,
            retries=args.retries,
            batch=args.batch,
            replace=args.replace,
            progress=view.line,
            live=view.running,
        )
    except PlanningFailed as error:
        print(f"asset-library: planning failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # before any run started: nothing to undo
        print("asset-library: interrupted before the ingest started", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        view.close()
    again = ["asset-library", "ingest", args.source, "--batch", summary.batch]
    again += ["--replace"] if summary.shards else []  # the batch's plan exists by now
    again += ["--library", library] if args.library else []
    again += ["--shard-size", str(args.shard_size)] if args.shard_size else []
    again += ["--workers", str(args.workers)] if args.workers is not None else []
    again += ["--parallel", str(args.parallel)] if args.parallel else []
    if summary.interrupted:
        print(f"\ninterrupted: batch {summary.batch} did not finish", file=sys.stderr)
        if summary.shards == 0:
            print("planning did not finish; nothing was ingested", file=sys.stderr)
        for shard in summary.unfinished_shards:
            print(f"NOT DONE  {shard}", file=sys.stderr)
        if summary.shards and not summary.unfinished_shards:
            print("every shard is in; the library refresh did not finish", file=sys.stderr)
        print(f"re-run:   {shlex.join(again)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    rate = summary.images / summary.seconds if summary.seconds else 0.0
    print()
    print(f"library   {resolve_home(library)}")
    print(f"batch     {summary.batch} (trigger {summary.trigger})")
    retried = f", {len(summary.retried)} of them after a retry" if summary.retried else ""
    print(
        f"shards    {summary.shards - len(summary.failed_shards)} ok{retried}, "
        f"{len(summary.failed_shards)} failed, {summary.parallel} at a time"
    )
    print(
        f"images    {summary.images:,} read, {summary.ok:,} ingested, "
        f"{summary.uploaded:,} new, {summary.already_stored:,} already stored (duplicates)"
    )
    if summary.repaired:
        print(f"repaired  {summary.repaired:,} damaged stored objects replaced with their bytes")
    rejects = sum(summary.rejects_by_reason.values())
    detail = ", ".join(f"{r}: {n}" for r, n in summary.rejects_by_reason.most_common())
    print(f"rejected  {rejects:,}" + (f" ({detail})" if detail else ""))
    if summary.refresh_failure:
        print(f"library   refresh FAILED: {summary.refresh_failure}")
        print("          `asset-library status` shows the shards images does not hold yet")
    else:
        print(
            f"library   {summary.catalog.get('images', 0):,} images, "
            f"{summary.catalog.get('rejects', 0):,} rejects, "
            f"{summary.catalog.get('attributes', 0):,} attribute values"
        )
    checks = ", ".join(
        f"{name} {'passed' if ok else 'FAILED'}" for name, ok in summary.checks.items()
    )
    print(f"checks    {checks or 'did not run'}")
    print(f"time      {summary.seconds:.1f} s, {rate:.1f} images/s")
    for shard in summary.failed_shards:
        print(f"FAILED    {shard}: {summary.failures.get(shard, '')}")
    if summary.failed_shards:
        print(f"re-run:   {shlex.join(again)}  (or a backfill of the failed shards in the UI)")
    return EXIT_OK if summary.success else EXIT_FAILED


def _status(args: argparse.Namespace) -> int:
    from asset_library.runs.status_report import status_lines

    layout = LibraryLayout.existing(args.library or default_library_path())
    print("\n".join(status_lines(layout)))
    return EXIT_OK


def _lookup(args: argparse.Namespace) -> int:
    from asset_library.library import ImageNotFoundError

    image = _library(args).lookup(args.md5)
    if image is None:
        raise ImageNotFoundError(args.md5)
    print(json.dumps(image, default=_json_default, indent=2))
    return EXIT_OK


def _similar(args: argparse.Namespace) -> int:
    found = _library(args).similar(
        args.image,
        max_distance=args.max_distance,
        limit=args.limit,
        hash=args.hash,
        transforms=args.transforms,
        min_quality=args.min_quality or None,
        confirm=args.confirm,
    )
    for record in found:
        print(json.dumps(record, default=_json_default))
    return EXIT_OK


def _duplicates(args: argparse.Namespace) -> int:
    for number, group in enumerate(_library(args).near_duplicate_groups()):
        print(json.dumps({"group": number, "size": len(group), "md5s": group}))
    return EXIT_OK


def _sql(args: argparse.Namespace) -> int:
    from asset_library.lake.sql_guard import check_read_only_query

    check_read_only_query(args.query)  # refused: a ValueError, exit 2 in main()
    with _library(args).connect() as connection:
        result = connection.execute(args.query, args.param)
        if result.description is None:
            return EXIT_OK
        names = [d[0] for d in result.description]
        if args.json:
            for row in result.fetchall():
                print(json.dumps(dict(zip(names, row, strict=True)), default=_json_default))
        else:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(names)
            writer.writerows(result.fetchall())
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from asset_library.serve import ServeSettings, serve

    settings = ServeSettings.resolve(
        args.library,
        host=args.host,
        cache_dir=args.cache_dir,
        max_upload_mb=args.max_upload_mb,
        upload_workers=args.upload_workers,
        decode_wait_s=args.decode_wait,
    )
    serve(settings, host=args.host, port=args.port, access_log=args.access_log)
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    from asset_library.lake import Lake
    from asset_library.migrate import migrate

    library = _library(args)
    done = migrate(library.layout, Lake.of(library.layout))
    if done.index_rows is not None:
        print(
            f"{library.path}: attribute index rebuilt to cover the image ({done.index_rows:,} rows)"
        )
        return EXIT_OK
    if not done.shards and not done.removed:
        print(f"{library.path}: already on the Delta lake, nothing to migrate")
        return EXIT_OK
    print(
        f"{library.path}: {len(done.shards)} shard(s) rewritten as Delta commits, "
        f"{done.images:,} images merged; removed {', '.join(done.removed) or 'nothing'}"
    )
    return EXIT_OK


def _move_to(args: argparse.Namespace) -> int:
    from asset_library.move import move_to

    layout = LibraryLayout.existing(args.library)
    moved = move_to(layout, args.target)
    print(
        f"{layout.location}: {moved.files:,} files ({moved.bytes:,} bytes) copied to "
        f"{moved.target}; use it with ASSET_LIBRARY_HOME={moved.target} (the folder is left "
        "as it was)"
    )
    for outside in moved.kept_outside:
        print(f"asset-library: still outside the library, as recorded: {outside}", file=sys.stderr)
    return EXIT_OK


def _recount(args: argparse.Namespace) -> int:
    from asset_library.lake import Lake
    from asset_library.lake.recount import recount

    library = _library(args)
    done = recount(Lake.of(library.layout))
    print(
        f"{library.path}: {done.corrected:,} md5s recounted ({done.difference:+,} occurrences) "
        f"against occurrences version {done.version}"
    )
    if done.left is not None:
        print(f"asset-library: left as found: {done.left.describe()}", file=sys.stderr)
        return 1
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def run() -> None:
    """The console script: :func:`main`, then out without the interpreter's teardown.

    After a read of a Delta table on S3, a C++ thread (pyarrow's or delta-rs's) can still be
    alive when the interpreter tears down, which then aborts with ``terminate called without an
    active exception`` (SIGABRT) after a complete answer: 4 of 138 ``sql`` runs on an S3 lake.
    So once :func:`main` has answered, the streams are flushed and logging shut down here, and
    the process leaves with main's code by ``os._exit``. A defect's traceback and argparse's
    own exit still leave the ordinary way."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: said in main already
            stream.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
