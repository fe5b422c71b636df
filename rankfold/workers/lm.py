"""A whole model in one worker, for the evaluators that need it whole: lm-eval's zero-shot tasks
(log-likelihood requests) and generation. Every worker opens the same location (a GGUF, a folder,
or a checkpoint in the artifact store, so any node can) and serves a slice of the documents; the
driver merges the slices in document order.

lm-eval's own data parallelism does not apply to a pre-built model, so shards split by document
(`simple_evaluate(samples={task: indices})`) and return per-document metrics, which the driver
aggregates with lm-eval's own aggregation functions.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext

import torch

from rankfold.checkpoint import model_from_source, rank_gains
from rankfold.core.device import use_device, worker_device
from rankfold.core.resources import process_peak_rss_mb
from rankfold.data.zeroshot_tasks import zeroshot_task
from rankfold.methods.plrd import DecodeSchedule, average_cost, decode_units, full_cost, solve_floor, step_ranks
from rankfold.modules.progressive import ProgressiveDecoding
from rankfold.modules.sparse import dense_products
from rankfold.workers.finite import FiniteLogits
from rankfold.workers.shard import cached_source


def _truncated(lm, arguments: list[tuple]) -> bool:
    """Whether lm-eval cut a log-likelihood request of these (context, continuation) pairs from the left:
    its tokens (lm-eval's own encoding) exceed the model's context + 1 (huggingface.py's rule)."""
    pairs = [args for args in arguments if len(args) == 2 and args[0]]  # lm-eval encodes an empty context apart
    return any(sum(map(len, lm._encode_pair(*pair))) > lm.max_length + 1 for pair in pairs)


def first_line(text: str) -> str:
    """The first non-blank line of a generated text, stripped (a summary is one sentence; models
    often open with a newline and go on past the summary)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


class ModelWorker:
    def __init__(self, location: str, dtype: str, threads: int | None = None, device: str = "auto"):
        """`device`: execution.device as this worker resolves it (core/device.py)."""
        if threads:  # Ray sets OMP_NUM_THREADS=1 for 1-CPU workers: use the CPUs this worker was given
            torch.set_num_threads(threads)
        source = cached_source(location)
        self.model = model_from_source(source, getattr(torch, dtype))
        if use_device(device).type == "cuda":  # a worker given a GPU evaluates there
            self.model.to(worker_device())
        else:  # torch's CPU CSR product is slower than dense and has no bfloat16: multiply with W̃ dense
            dense_products(self.model)
        self.tokenizer = copy.deepcopy(source.tokenizer())  # padding settings below stay this worker's
        self.gains = rank_gains(source)

    def zeroshot(self, indices: list[int], task: str, path: str, limit: int | None, batch_size: int) -> list[dict]:
        """Per-document metrics of `task` over the documents `indices` (of the file's first `limit`):
        [{"doc_id": int, "metrics": {"acc": 1.0, ...}, "truncated": bool}] in document order. `truncated`:
        a request of the document was longer than the model's context, and lm-eval cut its context from
        the left. NumericalError when a forward's logits are not finite (FiniteLogits)."""
        import datasets
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        datasets.disable_progress_bars()
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notes; truncation is counted below
        lm = HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=batch_size,
                  device=str(next(self.model.parameters()).device))
        # The task is built here; an empty task index spares lm-eval a scan of its ~14k task files.
        with FiniteLogits(self.model, f"zero-shot {task}"):
            out = lm_eval.simple_evaluate(model=lm, tasks=[zeroshot_task(task, path, limit)], samples={task: indices},
                                          log_samples=True, bootstrap_iters=0,
                                          task_manager=TaskManager(include_defaults=False))
        records = out["samples"][task]
        metrics = records[0]["metrics"] if records else []
        return sorted(({"doc_id": int(r["doc_id"]), "metrics": {m: float(r[m]) for m in metrics},
                        "truncated": _truncated(lm, r["arguments"])} for r in records), key=lambda r: r["doc_id"])

    def decode_plan(self, progressive: dict, max_new_tokens: int) -> dict:
        """A progressive schedule (DecodeSchedule fields) solved for this model: the schedule, the active
        ranks of every step, and decode costs as fractions of the compressed matrices' dense parameters."""
        units = decode_units(self.model, self.gains)
        schedule = solve_floor(DecodeSchedule(**progressive), units, max_new_tokens)
        dense = sum(u.dense_params for u in units)
        return {"schedule": schedule.model_dump(mode="json"),
                "ranks": step_ranks(schedule, units, max_new_tokens),
                "decode_cost": average_cost(schedule, units, max_new_tokens) / dense,
                "stored_cost": full_cost(units) / dense}

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int,
                 ranks: list[dict[str, int]] | None = None) -> list[str]:
        """Greedy continuations of `prompts` (transformers' generate with its KV cache, at most
        `max_new_tokens`, until EOS), each cut to its first non-blank line (`first_line`); prompts are
        batched by length (left padding), results in prompt order. `ranks`: active ranks per decode
        step (`decode_plan(...)["ranks"]`, solved once for every worker) — progressive decoding."""
        tok = self.tokenizer
        order = sorted(range(len(prompts)), key=lambda k: len(tok(prompts[k]).input_ids))
        outputs: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            with FiniteLogits(self.model, "generation"), ProgressiveDecoding(self.model, ranks) if ranks else nullcontext():
                texts = self._generate_batch([prompts[k] for k in batch], max_new_tokens)
            outputs.update(zip(batch, texts))
        return [outputs[k] for k in range(len(prompts))]

    def _generate_batch(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        tok = self.tokenizer
        tok.padding_side = "left"  # generation continues from the last position of every row
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(prompts, return_tensors="pt", padding=True).to(self.model.device)
        ids = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return [first_line(text) for text in tok.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)]

    def release(self) -> float:
        """Drop the model; returns this process's peak RSS (MiB) for the stage meter."""
        self.model = None
        return process_peak_rss_mb()
