"""``klviewer batch``: the command-line shell over :func:`klviewer.batch.runner.run_batch`."""

from __future__ import annotations

import argparse
import sys
from types import TracebackType

from klviewer.batch.discover import StudyJob
from klviewer.batch.manifest import DONE, StudyRecord
from klviewer.batch.runner import BatchObserver
from klviewer.batch.study import SliceProgress
from klviewer.cli.options import (
    SLICES_HELP,
    add_analysis_options,
    add_escalation_options,
    escalation_from_args,
    positive_int,
    settings_from_args,
)
from klviewer.errors import KlviewerInputError


class ProgressBars(BatchObserver):
    """Two tqdm bars on stderr: studies, and slices of the studies running now."""

    def __init__(self, quiet: bool) -> None:
        from tqdm import tqdm

        common = {"file": sys.stderr, "disable": quiet, "dynamic_ncols": True}
        self.studies = tqdm(total=0, desc="studies", unit="study", position=0, **common)
        self.slices = tqdm(total=0, desc="slices ", unit="slice", position=1, **common)
        self._seen: dict[str, tuple[int, int]] = {}
        self._finished: set[str] = set()
        self._failed = 0

    def on_start(self, to_run: list[StudyJob], already_done: int) -> None:
        self.studies.reset(total=len(to_run))
        if already_done:
            self.studies.write(f"{already_done} studies already done; {len(to_run)} to analyse", file=sys.stderr)

    def on_slice(self, progress: SliceProgress) -> None:
        # Progress from worker processes can arrive late; a finished study's count is final.
        if progress.study_id in self._finished:
            return
        done, total = self._seen.get(progress.study_id, (0, 0))
        self._seen[progress.study_id] = (max(done, progress.done), progress.total)
        self.slices.total += progress.total - total
        if progress.done > done:
            self.slices.update(progress.done - done)
        else:
            self.slices.refresh()

    def on_study(self, record: StudyRecord) -> None:
        done, total = self._seen.pop(record.id, (0, 0))
        self._finished.add(record.id)
        if record.status == DONE:
            self.slices.update(total - done)
        else:
            self._failed += 1
            self.slices.total -= total - done
            self.studies.set_postfix(failed=self._failed)
        self.studies.update(1)

    def __enter__(self) -> "ProgressBars":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.slices.close()
        self.studies.close()


def _backend(args: argparse.Namespace):
    from klviewer.batch.local import InProcessBackend, ProcessBackend
    from klviewer.batch.ray_backend import RayBackend

    if args.ray:
        return RayBackend(address=args.ray, max_actors=args.workers)
    return ProcessBackend(args.workers) if args.workers and args.workers > 1 else InProcessBackend()


def _cmd_batch(args: argparse.Namespace) -> int:
    from klviewer.batch.export_step import ExportOptions
    from klviewer.batch.runner import run_batch

    export = None
    if not args.export and (args.export_formats or args.export_all):
        raise KlviewerInputError(None, "--export-formats and --export-all go with --export")
    if args.export:
        formats = tuple(f.strip() for f in args.export_formats.split(",") if f.strip()) if args.export_formats else None
        export = ExportOptions(formats=formats, flagged_only=not args.export_all)
    with ProgressBars(args.quiet) as bars:
        result = run_batch(args.inputs, args.out, settings_from_args(args), prior=args.prior, slices=args.slices,
                           backend=_backend(args), export=export, observer=bars,
                           escalation=escalation_from_args(args))
    print(result.report())
    return 1 if result.failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``batch`` subcommand to the klviewer parser."""
    p = subparsers.add_parser(
        "batch", help="analyse every study under input folders, resumably; locally or on a Ray cluster",
        description="Find every study under INPUT (DICOM studies by StudyInstanceUID; each array or sinogram file "
                    "on its own) and analyse it into DIR/studies/<study>/ as `klviewer analyze` would. "
                    "DIR/manifest.json records each study's status, so running the same command again skips "
                    "finished studies and retries failed or interrupted ones. Exit code 1 when a study failed.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folder (walked recursively) or file")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="batch folder: new, empty, or an earlier batch's folder to resume it")
    p.add_argument("--slices", default="all", help=SLICES_HELP.replace("(default", "per series (default"))
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="local worker processes (default 1: this process); with --ray, the most actors to start")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run studies on Ray actors: 'auto' (the running cluster), 'local' (start one here), "
                        "or a cluster address such as ray://head:10001 (needs klviewer[cluster])")
    p.add_argument("--export", action="store_true", help="export finished studies' flagged cases into DIR/export/<study>/")
    p.add_argument("--export-formats", metavar="LIST", help="comma-separated export formats (default: all), e.g. dicom,png,pdf,csv")
    p.add_argument("--export-all", action="store_true", help="with --export: every analysed case, not only flagged ones")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_analysis_options(p)
    add_escalation_options(p)
    p.set_defaults(func=_cmd_batch)
