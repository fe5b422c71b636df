"""`rankfold` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from rankfold.checkpoint import CheckpointError
from rankfold.data.text import DataError
from rankfold.jobs.spec import SpecError, load_spec, parse_spec
from rankfold.models.sources import ModelSourceError
from rankfold.orchestrator.ray_executor import ClusterError
from rankfold.orchestrator.store import StoreError
from rankfold.workers.decompose import DecompositionError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _run(args: argparse.Namespace) -> int:
    from rankfold.orchestrator.job import run_job

    spec = load_spec(args.spec)
    overrides = {k: v for k, v in (("executor", args.executor), ("address", args.address),
                                   ("workers", args.workers)) if v is not None}
    if args.address and "executor" not in overrides:
        overrides["executor"] = "ray"
    if overrides:  # validated like the file itself
        data = spec.model_dump(mode="json")
        data["execution"] = {**data["execution"], **overrides}
        spec = parse_spec(data, origin=f"{args.spec} (with command-line options)")
    run_job(spec, stream=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankfold", description="Low-rank compression of LLMs, layer by layer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a compression job in this process")
    run.add_argument("spec", help="job spec (YAML or JSON)")
    run.add_argument("--executor", choices=["local", "ray"], help="override execution.executor")
    run.add_argument("--address", help="Ray cluster address (implies --executor ray)")
    run.add_argument("--workers", type=int, help="override execution.workers")
    run.set_defaults(handler=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (SpecError, ModelSourceError, DataError, CheckpointError, StoreError, ClusterError) as err:
        print(f"rankfold: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DecompositionError as err:
        print(f"rankfold: decomposition failed: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
