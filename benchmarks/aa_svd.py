"""AA-SVD's official code (arXiv 2604.02119; github.com/atulkumarin/AA-SVD, MIT) on rankfold's anchored
benchmark's calibration windows and evaluation, beside the rows of benchmarks/anchored.py.

AA-SVD runs in a virtual environment of its own (its pins: transformers 4.55) from a checkout patched
only to run on the CPU (benchmarks/aa_svd_cpu.patch: `device='cuda'` → the configured device, and its
hard-coded 25 fine-tuning passes read from the config). benchmarks/aa_svd_driver.py hands it the
calibration token ids instead of its hub loader and writes the compressed model back as a dense Llama
folder, which rankfold then evaluates (`rankfold eval`'s path: the same perplexity code and texts).

    python -m venv ../aasvd-venv && ../aasvd-venv/bin/pip install torch==2.13.0 transformers==4.55.0 \
        hydra-core omegaconf wandb bitsandbytes numpy rich sentencepiece tqdm safetensors
    python -m benchmarks.aa_svd --python ../aasvd-venv/bin/python --git-dir <AA-SVD clone's .git or the
        `fetch` snapshot> --ratios 0.2 0.4 --variants obj2 obj4 obj4+refine --refine-epochs 1

Variants: obj2 (its SVD-LLM objective: checks that both sides see the same model, data and ranks —
rankfold's `svd_llm` with uniform ranks is the same fit), obj4 (its anchored closed form, no
fine-tuning), obj4+refine (then its AdamW fine-tuning of every block toward the dense block's output,
--refine-epochs passes over the calibration batches; its default is 25). A ratio r keeps 1 − r of
every compressed linear's parameters (AA-SVD's target_param_ratio), as rankfold's uniform allocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file
from benchmarks import anchored  # noqa: E402
from benchmarks.common import REPO, RESULTS, describe, provenance, write_result  # noqa: E402
from rankfold.cli import logging_to_stderr  # noqa: E402
from rankfold.evaluation.report import metric_table  # noqa: E402
from rankfold.jobs.spec import parse_any_spec  # noqa: E402
from rankfold.models.sources import open_source  # noqa: E402
from rankfold.orchestrator.evaluation_run import run_evaluation  # noqa: E402
from rankfold.storage.store import LocalStore  # noqa: E402

PATCH = REPO / "benchmarks" / "aa_svd_cpu.patch"
DRIVER = REPO / "benchmarks" / "aa_svd_driver.py"
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template")
VARIANTS = {"obj2": ("obj2", False), "obj4": ("obj4", False), "obj4+refine": ("obj4", True)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", type=Path, required=True, help="the AA-SVD virtual environment's python")
    parser.add_argument("--git-dir", type=Path, help="an AA-SVD git directory (archived at --rev, then patched)")
    parser.add_argument("--repo", type=Path, help="an already patched AA-SVD checkout (instead of --git-dir)")
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--refine-epochs", type=int, default=1, help="obj4+refine's passes over the calibration")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rankfold-aa-svd")
    parser.add_argument("--out", type=Path, default=RESULTS / "anchored")
    args, rest = parser.parse_known_args(argv)
    args.bench = anchored.parse_args(rest)  # --model, --calib-*, --seq-len, --eval-*, --window: as anchored's
    if (args.git_dir is None) == (args.repo is None):
        parser.error("give one of --git-dir and --repo")
    return args


def checkout(args: argparse.Namespace) -> tuple[Path, str]:
    """(the patched checkout, its commit): --repo as given, or --git-dir archived at --rev and patched."""
    if args.repo is not None:
        return args.repo, "given checkout"
    commit = subprocess.run(["git", "--git-dir", str(args.git_dir), "rev-parse", args.rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    folder = args.work / f"aa-svd-{commit[:12]}"
    stamp = folder / ".rankfold-patched"  # written once the patch applied: a failed patch is redone
    if not stamp.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        archive = subprocess.run(["git", "--git-dir", str(args.git_dir), "archive", commit], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "x", "-C", str(folder)], input=archive, check=True)
        subprocess.run(["patch", "-p1", "-i", str(PATCH)], cwd=folder, check=True, capture_output=True)
        stamp.write_text(PATCH.read_text())
    return folder, commit


def model_folder(source_name: str, folder: Path) -> Path:
    """The model as a Hugging Face folder (config, tokenizer, float32 safetensors) for AA-SVD to load."""
    from safetensors.torch import save_file

    if (folder / "model.safetensors").exists():
        return folder
    source = open_source(source_name)
    folder.mkdir(parents=True, exist_ok=True)
    source.config.save_pretrained(folder)
    source.tokenizer().save_pretrained(folder)
    save_file({key: source.tensor(key).float().contiguous() for key in source.keys()}, str(folder / "model.safetensors"))
    return folder


def calibration_ids(args: argparse.Namespace, path: Path) -> Path:
    """The anchored benchmark's calibration windows (its spec's sample), saved as int64 token ids."""
    import torch

    spec = anchored.job(args.bench, "svd_llm", "uniform", args.ratios[0], "plain", args.work / "unused")
    torch.save(spec.calibration.sample().ids(open_source(args.bench.model).tokenizer()).long(), path)
    return path


def run_driver(args, repo: Path, model: Path, ids: Path, ratio: float, variant: str, out: Path) -> dict:
    objective, refine = VARIANTS[variant]
    command = [str(args.python), str(DRIVER), "--repo", str(repo), "--model", str(model), "--calib", str(ids),
               "--out", str(out), "--keep-ratio", f"{1 - ratio:g}", "--objective", objective,
               "--refine-epochs", str(args.refine_epochs if refine else 0), "--batch-size", str(args.batch_size),
               "--threads", str(os.cpu_count() or 1)]
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"AA-SVD {variant} @ {ratio:.0%} failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
    for path in model.iterdir():  # the tokenizer's files: AA-SVD saves the model only
        if path.name.startswith(TOKENIZER_FILES):
            shutil.copy(path, out / path.name)
    return json.loads(done.stdout.strip().splitlines()[-1])


def evaluated(args: argparse.Namespace, folder: Path, store: LocalStore) -> dict[str, float]:
    """Perplexity on the anchored benchmark's texts ({text: value}), through `rankfold eval`'s code."""
    spec = anchored.job(args.bench, "svd_llm", "uniform", args.ratios[0], "plain", folder.parent / f"{folder.name}-eval")
    evaluation = {"model": {"source": str(folder), "dtype": args.bench.dtype},
                  "evaluation": {"perplexity": [entry.model_dump(mode="json") for entry in spec.evaluation.perplexity]},
                  "output": {"dir": str(folder.parent / f"{folder.name}-eval")}}
    report = run_evaluation(parse_any_spec(evaluation), store=store)
    return {row["name"]: row["compressed"] if row.get("compressed") is not None else row["dense"]
            for row in metric_table(report["rows"])}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    repo, commit = checkout(args)
    model = model_folder(args.bench.model, args.work / f"model-{Path(args.bench.model).name}")
    ids = calibration_ids(args, args.work / "calibration-ids.pt")
    store, rows = LocalStore(args.work / "artifacts"), []
    dense = evaluated(args, model, store)
    for ratio in args.ratios:
        for variant in args.variants:
            out = args.work / f"{variant}-{ratio:g}"
            ran = run_driver(args, repo, model, ids, ratio, variant, out)
            rows.append({"method": "AA-SVD (official code)", "ratio": ratio, "variant": variant,
                         "refine_epochs": args.refine_epochs if VARIANTS[variant][1] else 0,
                         "ppl": evaluated(args, out, store), "fitting_s": ran["seconds"],
                         "kept_fraction": ran["kept_fraction"]})
            print(f"AA-SVD {variant} @ {ratio:.0%}: {rows[-1]['ppl']} ({ran['seconds']:.0f} s)", file=sys.stderr)
            result = {**provenance("aa_svd", argv), "aa_svd_commit": commit, "patch": PATCH.name,
                      "model": args.bench.model, "batch_size": args.batch_size,
                      "calibration": {"data": str(args.bench.calib_data), "samples": args.bench.calib_samples,
                                      "seq_len": args.bench.seq_len},
                      "evaluation": {"wikitext2": str(args.bench.eval_data), "second": str(args.bench.second_eval),
                                     "window": args.bench.window, "tokens": args.bench.eval_tokens},
                      "dense": dense, "rows": rows}
            write_result("aa-svd", result, folder=args.out, markdown=to_markdown(result))
    print(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    lines = [f"# AA-SVD's official code — {result['model']}", "",
             f"AA-SVD at commit {result['aa_svd_commit']}, patched by benchmarks/{result['patch']}; calibration "
             f"{result['calibration']['samples']} × {result['calibration']['seq_len']} tokens (the anchored benchmark's "
             f"windows), batches of {result['batch_size']}; perplexity over {result['evaluation']['tokens']} tokens "
             f"in windows of {result['evaluation']['window']}. Dense: "
             + ", ".join(f"{text} {value:.2f}" for text, value in result["dense"].items()) + ".", "",
             "Uniform ranks on plain low-rank matrices (AA-SVD's own allocation): compare with rankfold's "
             "`--methods svd_llm --allocations uniform` rows (obj2 is that fit); AA-SVD's defaults are 25 refine "
             "passes and batches of 32.", "",
             "| ratio | variant | refine passes | WikiText-2 | second text | kept fraction | fitting s |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['ratio']:.0%} | {row['variant']} | {row['refine_epochs']} | {row['ppl']['wikitext2']:.2f} "
                     f"| {row['ppl']['second']:.2f} | {row['kept_fraction']:.4f} | {row['fitting_s']:.0f} |")
    lines += ["", f"Command: `{result['command']}`; machine: {describe(result['machine'])}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with logging_to_stderr():
        main()
