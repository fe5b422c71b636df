"""The evaluator registry. An evaluator takes a model (a source location every worker can open, plus
its compressed layout), its options and the executor, and returns rows of
`{"metric": str, "value": float, ...the settings it was measured under}`. Report, history and CLI
read rows generically, so a new evaluator is one file and one `register_evaluator` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from pydantic import Field
from transformers import PreTrainedTokenizerBase

from rankfold.core.options import Strict
from rankfold.core.registry import Registry
from rankfold.data.source import TextSource
from rankfold.execution.base import Executor
from rankfold.methods.plrd import DecodeUnit

Row = dict[str, object]


class EvaluatorOptions(Strict):
    """Base of one evaluation entry in the spec: `name` labels its rows (e.g. "wikitext2")."""

    name: str = Field(min_length=1)
    unhashed: ClassVar[frozenset[str]] = frozenset({"name"})  # a label: renaming keeps the result


@dataclass(frozen=True)
class EvaluationContext:
    executor: Executor
    location: str                                # model source location (workers open it)
    num_layers: int
    layout: Callable[[int], list[dict] | None]   # layer -> its compressed modules (JSON); None: dense
    tokenizer: PreTrainedTokenizerBase
    dtype: str                                   # forward dtype, e.g. "float32"
    scratch: Path                                # spill space for activations
    label: str                                   # for progress lines, e.g. "perplexity wikitext2 dense"


@dataclass(frozen=True)
class DecodeFacts:
    """A compressed model's progressive-decoding units, known before it loads (methods/plrd.py)."""

    units: list[DecodeUnit]                      # ranks and shapes of its rank modules (no gains)
    gains: bool                                  # FLRA's decode order is (or will be) recorded
    slack: float = 0.0                           # parameters per token the final ranks may move the costs by


@dataclass(frozen=True)
class ModelFacts:
    """What an evaluator's check reads about the model it will evaluate, before any work: the tokenizer,
    the context (positions the model takes: its config's max_position_embeddings; None: unbounded) and,
    for a compressed model, its decode facts (built on demand: a meta-device model; None when dense;
    ValueError for a layout without nested ranks)."""

    tokenizer: PreTrainedTokenizerBase
    context: int | None
    decode: Callable[[], DecodeFacts | None] = lambda: None


@dataclass(frozen=True)
class Evaluator:
    name: str                                    # its key under `evaluation:` in the spec
    options: type[EvaluatorOptions]
    evaluate: Callable[[EvaluatorOptions, EvaluationContext], list[Row]]
    version: str                                 # part of the digest of every result
    # the data whose content is part of the digest: the files its reader opens (data_files / a TextSource,
    # found by running the reader), never a list kept here
    inputs: Callable[[EvaluatorOptions], list[TextSource]]
    # check(options, facts): everything decidable before any work (ValueError naming the field)
    check: Callable[[EvaluatorOptions, ModelFacts], None] = lambda options, facts: None


EVALUATORS: Registry[Evaluator] = Registry("evaluator")


def register_evaluator(evaluator: Evaluator) -> Evaluator:
    if evaluator.name in ("dense",):
        raise ValueError(f"evaluator name {evaluator.name!r} is reserved in the spec's evaluation section")
    return EVALUATORS.register(evaluator.name, evaluator)
