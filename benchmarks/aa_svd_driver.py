"""Runs AA-SVD's official code (github.com/atulkumarin/AA-SVD, MIT) on one model and one calibration
tensor, in AA-SVD's own virtual environment — this file imports nothing from rankfold.
benchmarks/aa_svd.py starts it; see there for the setup and the patch (benchmarks/aa_svd_cpu.patch).

    <aa-svd venv>/bin/python benchmarks/aa_svd_driver.py --repo <patched checkout> --model <HF folder> \
        --calib ids.pt --out <folder> --keep-ratio 0.8 --objective obj4 --refine-epochs 0

Calls AA-SVD's `apply_compression` as its `main.py` does, with its hub data loader replaced by the
given token ids (targets shifted by one, as its TextCalibrationDataset makes them), then writes each
CompressedLinear back as a dense nn.Linear (U·V) so that any Llama loader reads the folder. Prints one
JSON line: seconds, the kept fraction of the compressed linears' parameters and the ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

# not this file's folder on the path: its aa_svd.py would shadow AA-SVD's package (before any import)
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="AA-SVD checkout with benchmarks/aa_svd_cpu.patch applied")
    parser.add_argument("--model", required=True, help="Hugging Face Llama folder")
    parser.add_argument("--calib", required=True, help="torch.save'd int64 token ids (samples, seq_len)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--keep-ratio", type=float, required=True, help="AA-SVD's target_param_ratio")
    parser.add_argument("--objective", default="obj4", help="obj2: SVD-LLM; obj4: AA-SVD's anchored closed form")
    parser.add_argument("--refine-epochs", type=int, default=0, help="AA-SVD's block fine-tuning passes (its default 25)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def compress(args: argparse.Namespace):
    from aa_svd.compression import apply_compression
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    ids = torch.load(args.calib, weights_only=True).long()
    targets = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
    batches = torch.utils.data.DataLoader([{"input_ids": x, "targets": y} for x, y in zip(ids, targets)],
                                          batch_size=args.batch_size, shuffle=False)
    factors = args.out + "_factors"
    shutil.rmtree(factors, ignore_errors=True)  # AA-SVD resumes from its save_path: start afresh
    config = types.SimpleNamespace(
        sub_method=args.objective, target_param_ratio=args.keep_ratio, include_only=None, exclude_only=["lm_head"],
        rank_allocation_file_path=None, device="cpu", dobi_remapping=False, save_path=factors,
        finetune={"enabled": args.refine_epochs > 0, "include": "all"}, finetune_steps=args.refine_epochs)
    return apply_compression(model, config, calibration_dataloader_train=batches, calibration_dataloader_val=None)


def densified(model) -> tuple[dict[str, int], int, int]:
    """Each CompressedLinear replaced by nn.Linear(U·V) in place. Returns ({module: rank}, kept, dense)
    parameter counts of the compressed linears."""
    from aa_svd.compression.compressed_linear import CompressedLinear

    ranks, kept, dense = {}, 0, 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, CompressedLinear):
            continue
        up, down = module.U.weight, module.V.weight  # (out, r), (r, in)
        linear = torch.nn.Linear(down.shape[1], up.shape[0], bias=module.U.bias is not None)
        linear.weight.data = (up @ down).detach().contiguous()
        if module.U.bias is not None:
            linear.bias.data = module.U.bias.detach().clone()
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, linear)
        ranks[name], kept, dense = up.shape[1], kept + up.numel() + down.numel(), dense + up.shape[0] * down.shape[1]
    return ranks, kept, dense


def main() -> None:
    args = parse_args()
    sys.path.insert(0, args.repo)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = compress(args)
    seconds = time.perf_counter() - started
    ranks, kept, dense = densified(model)
    model.config.use_cache = True
    model.save_pretrained(args.out, safe_serialization=True)
    print(json.dumps({"seconds": round(seconds, 1), "kept_fraction": kept / dense if dense else 1.0,
                      "ranks": ranks}))


if __name__ == "__main__":
    main()
