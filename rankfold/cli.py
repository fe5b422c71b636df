"""`rankfold` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator

from rankfold.core.errors import EXIT_BAD_INPUT, EXIT_FAILED, RankfoldError
from rankfold.core.redact import redact
from rankfold.jobs.spec import JobSpec, SpecError, load_any_spec, parse_any_spec

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "build_parser", "logging_to_stderr", "main"]


class _PlainFormatter(logging.Formatter):
    """INFO as the bare message (progress lines, the report); other levels say which, and where from."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return super().format(record)
        return f"{record.levelname} {record.name}: {super().format(record)}"


@contextlib.contextmanager
def logging_to_stderr(level: int = logging.INFO) -> Iterator[None]:
    """rankfold's messages at `level` and above written to stderr while inside; the logger is put back
    on exit, so in-process callers (tests, benchmarks) keep their own logging."""
    logger = logging.getLogger("rankfold")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter())
    saved_level, saved_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # a root handler (a library's basicConfig) would print every line twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate


def _with_overrides(spec, args: argparse.Namespace):
    """The spec with --executor / --address / --workers / --device / --gpus-per-worker applied, validated
    like the file itself."""
    overrides = {k: v for k, v in (("executor", args.executor), ("address", args.address),
                                   ("workers", args.workers), ("device", getattr(args, "device", None)),
                                   ("gpus_per_worker", getattr(args, "gpus_per_worker", None))) if v is not None}
    if args.address and "executor" not in overrides:
        overrides["executor"] = "ray"
    if not overrides:
        return spec
    data = spec.model_dump(mode="json")
    data["execution"] = {**data["execution"], **overrides}
    return parse_any_spec(data, origin=f"{args.spec} (with command-line options)")


def _run(args: argparse.Namespace) -> int:
    from rankfold.orchestrator.job import run_job

    spec = _with_overrides(load_any_spec(args.spec), args)
    if not isinstance(spec, JobSpec):
        raise SpecError(f"{args.spec}: an evaluation spec (no `method`): run it with `rankfold eval`")
    run_job(spec)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rankfold.orchestrator.evaluation_run import require_eval_spec, run_evaluation

    run_evaluation(require_eval_spec(_with_overrides(load_any_spec(args.spec), args), args.spec))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from rankfold.orchestrator.submit import job_api_address, submit

    submission_id = submit(args.spec, args.address, args.workers)
    where = f" --address {args.address}" if args.address else ""
    print(submission_id)
    print(f"submitted to {job_api_address(args.address)}; follow with: rankfold logs {submission_id} --follow{where}",
          file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    from rankfold.orchestrator.submit import status

    info = status(args.job, args.address)
    print(f"{info['id']}  {info['status']}  {info['spec']}  -> {info['output']}" +
          (f"\n  {info['message']}" if info["message"] else ""))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from rankfold.orchestrator.submit import follow_logs, logs

    if not args.follow:
        print(logs(args.job, args.address), end="")
        return 0
    for chunk in follow_logs(args.job, args.address):
        print(chunk, end="", flush=True)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from rankfold.orchestrator.submit import cancel

    print(f"{args.job}: {'stop requested' if cancel(args.job, args.address) else 'already finished'}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from rankfold.orchestrator.submit import list_jobs

    jobs = list_jobs(args.address)
    for job in jobs:
        print(f"{job['id']}  {job['status']:9s}  {job['started']}  {job['spec']}  -> {job['output']}")
    if not jobs:
        print("no rankfold jobs on this cluster", file=sys.stderr)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from rankfold.orchestrator.schedule import ScheduleRegistry

    entry = ScheduleRegistry(args.registry).add(args.spec, args.cron, args.address, args.name)
    print(f"{entry.name}: '{entry.cron}' -> next run {entry.next_run} (run `rankfold scheduler` to submit runs)")
    return 0


def _schedules(args: argparse.Namespace) -> int:
    from rankfold.orchestrator.schedule import ScheduleRegistry

    registry = ScheduleRegistry(args.registry)
    if args.remove:
        return 0 if registry.remove(args.remove) else EXIT_BAD_INPUT
    for entry in registry.entries():
        print(f"{entry.name}  '{entry.cron}'  next {entry.next_run}  last {entry.last_run or '-'}  {entry.spec}")
    return 0


def _scheduler(args: argparse.Namespace) -> int:
    from datetime import datetime

    from rankfold.orchestrator.schedule import ScheduleRegistry, parse_now, run_due, scheduler_loop
    from rankfold.orchestrator.submit import submit

    registry = ScheduleRegistry(args.registry)
    if args.once:
        now = parse_now(args.now) if args.now else datetime.now()
        run_due(registry, now, submit, log=lambda line: print(line, flush=True))
        return 0
    scheduler_loop(registry, submit, args.poll, log=lambda line: print(line, flush=True))
    return 0


def _history(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rankfold.orchestrator.history import format_history, load_history, plot_history
    from rankfold.orchestrator.job import open_store
    from rankfold.orchestrator.preflight import job_id as id_of

    spec = load_any_spec(args.spec)
    job_id = id_of(spec)
    records = load_history(open_store(spec), job_id)
    if not records:
        print(f"no runs of {args.spec} recorded yet", file=sys.stderr)
        return 0
    print(format_history(records))
    plot = Path(args.plot) if args.plot else Path(spec.output.dir) / "history.png"
    plot_history(plot, records, title=f"{Path(args.spec).name} ({job_id[:12]})")
    print(f"plot: {plot}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from rankfold.orchestrator.verify import verify

    checked = verify(args.target, repair=args.repair)
    print("\n".join(checked.lines))
    return EXIT_FAILED if checked.problems else 0


def _export(args: argparse.Namespace) -> int:
    from rankfold.export.folder import export

    done = export(args.source, args.out, form=args.form, max_shard_size=args.max_shard_size)
    remote = ", trust_remote_code=True" if done.code_files else ""
    print(f"wrote {done.folder} ({done.form}, model type {done.model_type}); load it with "
          f"AutoModelForCausalLM.from_pretrained({str(done.folder)!r}{remote})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankfold", description="Low-rank compression of LLMs, layer by layer.")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    loudness.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only: no progress or report")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, text, what in (
            ("run", _run, "run a compression job in this process", "job spec (YAML or JSON)"),
            ("eval", _eval, "evaluate an existing model or checkpoint (a spec without `method`)",
             "evaluation spec (YAML or JSON): model, evaluation, output")):
        command = commands.add_parser(name, help=text)
        command.add_argument("spec", help=what)
        command.add_argument("--executor", choices=["local", "ray"], help="override execution.executor")
        command.add_argument("--address", help="Ray cluster address (implies --executor ray)")
        command.add_argument("--workers", type=int, help="override execution.workers")
        command.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override execution.device")
        command.add_argument("--gpus-per-worker", type=float, help="override execution.gpus_per_worker (Ray)")
        command.set_defaults(handler=handler)

    api = "Ray Job API address (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS if http, or http://127.0.0.1:8265)"
    submit = commands.add_parser("submit", help="submit a job to a Ray cluster (Job API)")
    submit.add_argument("spec", help="job spec (YAML or JSON)")
    submit.add_argument("--address", help=api)
    submit.add_argument("--workers", type=int, help="override execution.workers")
    submit.set_defaults(handler=_submit)
    for name, handler, text in (("status", _status, "a submitted job's state"),
                                ("logs", _logs, "a submitted job's log (progress lines, report)"),
                                ("cancel", _cancel, "stop a submitted job")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job", help="submission id printed by `rankfold submit`")
        command.add_argument("--address", help=api)
        if name == "logs":
            command.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        command.set_defaults(handler=handler)
    listing = commands.add_parser("list", help="rankfold jobs on the cluster")
    listing.add_argument("--address", help=api)
    listing.set_defaults(handler=_list)

    registry_help = "schedule registry (default $RANKFOLD_HOME/schedules.json, ~/.rankfold)"
    schedule = commands.add_parser("schedule", help="register a spec to be submitted on a cron schedule")
    schedule.add_argument("spec")
    schedule.add_argument("--cron", required=True, help='five fields, e.g. "0 2 * * *" (02:00 daily, local time)')
    schedule.add_argument("--name", help="entry name (default: the spec's file name)")
    schedule.add_argument("--address", help=api)
    schedule.add_argument("--registry", help=registry_help)
    schedule.set_defaults(handler=_schedule)
    schedules = commands.add_parser("schedules", help="list (or --remove NAME) registered schedules")
    schedules.add_argument("--remove", metavar="NAME")
    schedules.add_argument("--registry", help=registry_help)
    schedules.set_defaults(handler=_schedules)
    scheduler = commands.add_parser("scheduler", help="submit due scheduled runs (a long-running process)")
    scheduler.add_argument("--registry", help=registry_help)
    scheduler.add_argument("--poll", type=float, default=30.0, help="seconds between checks")
    scheduler.add_argument("--once", action="store_true", help="check once and exit (cron-driven use, tests)")
    scheduler.add_argument("--now", help="with --once: the time to check against (ISO), for tests")
    scheduler.set_defaults(handler=_scheduler)
    history = commands.add_parser("history", help="a spec's recorded runs: trend table and PNG plot")
    history.add_argument("spec")
    history.add_argument("--plot", help="PNG path (default OUTPUT_DIR/history.png)")
    history.set_defaults(handler=_history)
    verify = commands.add_parser("verify", help="hash every artifact of a job (SPEC) or every shard of a checkpoint "
                                                "folder (PATH) against its recorded sha256")
    verify.add_argument("target", help="job or evaluation spec, or checkpoint folder")
    verify.add_argument("--repair", action="store_true", help="drop the records of stages whose artifacts are "
                                                               "missing or damaged, so the next run recomputes them")
    verify.set_defaults(handler=_verify)
    export = commands.add_parser("export", help="write a model as a transformers folder that loads without rankfold")
    export.add_argument("source", help="checkpoint folder, a job's output folder, or any model rankfold opens")
    export.add_argument("out", help="new folder to write")
    export.add_argument("--form", choices=["native", "lowrank", "dense"], default="native",
                        help="native: every structure as stored (remote code); lowrank: plain two-linear factors, "
                             "what vLLM serves (remote code); dense: W = B A, the family's own model")
    export.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    export.set_defaults(handler=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # other libraries' warnings (or everything, with -v) keep a timestamped format of their own
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    try:
        with logging_to_stderr(level):
            return args.handler(args)
    except RankfoldError as err:  # each error class carries its exit code and label (core/errors.py)
        print(f"rankfold: {err.label}: {redact(str(err))}", file=sys.stderr)  # never a credential
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
