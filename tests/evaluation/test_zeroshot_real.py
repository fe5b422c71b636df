"""Dense SmolLM2-135M-Instruct on the first 200 documents of each task, float32, through the whole
zero-shot path (local files -> lm-eval's task configs -> HFLM -> per-document metrics -> lm-eval's
aggregation). Windows: the values measured on 2026-11-29 (this test's own path) ± 0.06 (≈ 1.7 standard
errors at 200 documents). Public figures for this model family: PIQA 0.65-0.70, ARC-e 0.5-0.6,
HellaSwag ~0.4; BoolQ sits near its majority class ("no" 37 % of these 200) and WinoGrande near chance
at this size. Far-above-chance floors guard the tasks where the model has skill."""

from __future__ import annotations

import pytest

from rankfold.evaluation.registry import EvaluationContext
from rankfold.evaluation.zeroshot import ZeroShotOptions, evaluate_zeroshot
from rankfold.execution.local import LocalExecutor

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]

FILES = {"piqa": "piqa/valid.jsonl", "arc_easy": "arc/ARC-Easy-Test.jsonl",
         "arc_challenge": "arc/ARC-Challenge-Test.jsonl", "hellaswag": "hellaswag/hellaswag_val.llamacpp.jsonl",
         "winogrande": "winogrande/dev.jsonl", "boolq": "boolq/val.jsonl", "openbookqa": "openbookqa/test.jsonl"}
MEASURED = {"piqa acc": 0.64, "piqa acc_norm": 0.655, "arc_easy acc": 0.51, "arc_easy acc_norm": 0.465,
            "arc_challenge acc": 0.235, "arc_challenge acc_norm": 0.28, "hellaswag acc": 0.405,
            "hellaswag acc_norm": 0.47, "winogrande acc": 0.515, "boolq acc": 0.42, "openbookqa acc": 0.19,
            "openbookqa acc_norm": 0.355}
CHANCE_FLOORS = {"piqa acc": 0.58, "arc_easy acc": 0.42, "hellaswag acc_norm": 0.38}  # chance: 0.5, 0.25, 0.25


def test_dense_smollm2_accuracy_windows(smollm2, shared_data, tmp_path):
    options = ZeroShotOptions(name="suite", tasks={t: {"path": str(shared_data / p), "limit": 200}
                                                   for t, p in FILES.items()})
    context = EvaluationContext(LocalExecutor(), smollm2.location, smollm2.num_layers, lambda i: None,
                                smollm2.tokenizer(), "float32", tmp_path, "dense")
    rows = {row["metric"]: row["value"] for row in evaluate_zeroshot(options, context)}
    for metric, measured in MEASURED.items():
        assert abs(rows[metric] - measured) <= 0.06, f"{metric}: {rows[metric]:.3f}, measured {measured}"
    for metric, floor in CHANCE_FLOORS.items():
        assert rows[metric] >= floor, f"{metric}: {rows[metric]:.3f} not above chance"
