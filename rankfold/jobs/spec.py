"""The job spec: everything a compression run depends on, as strict pydantic models.

A spec is data. Every model forbids unknown fields, so a typo in a YAML file is an error naming the
field, never a silently ignored option; a key written twice in the YAML is an error naming it and
its lines, never a silent last-wins; a URL carrying credentials (`http://KEY:SECRET@host`) is refused,
the secret not echoed. Relative paths are resolved against the current working directory (run
`rankfold` from the folder the spec's paths are written for).

Example (jobs/smollm2-svdllm-20.yaml):

    model: {source: smollm2-135m}
    method: {name: svd_llm}
    target: {ratio: 0.2}
    calibration: {data: {path: ../shared/data/calibration/enwiki_excerpt.txt}, num_samples: 128, seq_len: 512}
    evaluation: {perplexity: [{name: wikitext2, data: {path: ../shared/data/wikitext2/wiki.test.raw}}]}
    output: {dir: runs/smollm2-svdllm-20}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, create_model, field_validator, model_validator

import rankfold.allocators  # noqa: F401  (registers every allocator)
import rankfold.evaluation  # noqa: F401  (registers every evaluator)
import rankfold.methods  # noqa: F401  (registers every method)
from rankfold.allocators.registry import ALLOCATORS, current_kind
from rankfold.allocators.uniform import UniformAllocation
from rankfold.core.device import DeviceName
from rankfold.core.errors import BadInput
from rankfold.core.options import Strict
from rankfold.core.redact import has_url_credentials, redact
from rankfold.core.strict_yaml import DuplicateKeyError, load_yaml
from rankfold.data.source import TextSource
from rankfold.data.text import CalibrationSample
from rankfold.evaluation.registry import EVALUATORS
from rankfold.methods.kv_registry import KV_METHODS
from rankfold.methods.registry import METHODS

SPEC_VERSION = 1

# Projection names across the supported families (the model's own decides which exist: preflight);
# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj (naming all the parts names it too).
Projection = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                     "gate_up_proj"]
ALL_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SpecError(BadInput, ValueError):
    """A job spec that cannot run: names the field, the value and what is wrong. Anything
    credential-shaped in the message is masked (core.redact): a spec's values are echoed in it."""

    def __init__(self, message: str):
        super().__init__(redact(message))


class ModelSpec(Strict):
    # A Hugging Face folder with (sharded) safetensors, a .gguf file, or a built-in name (smollm2-135m).
    source: str
    # dtype of the compressed factors and of every forward pass. fp16 matmuls are ~100x slower on CPU.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def _union(options: dict[str, type], discriminator: Discriminator) -> object:
    """A pydantic tagged union of registered option models, {tag: model} (a single one needs no union)."""
    if len(options) == 1:
        return next(iter(options.values()))
    return Annotated[Union[tuple(Annotated[model, Tag(tag)] for tag, model in options.items())], discriminator]


def _method_name(value: object) -> str | None:
    return value.get("name") if isinstance(value, dict) else getattr(value, "name", None)


def _tagged_by(field: str, tag, known: list[str]) -> Discriminator:
    return Discriminator(tag, custom_error_type="unknown_tag",
                         custom_error_message=f"'{field}' must be one of: {', '.join(known)}")


# Every registered method's options, tagged by `name`; an unknown name is an error listing the known ones.
MethodSpec = _union({method.name: method.options for method in METHODS},
                    _tagged_by("name", _method_name, METHODS.names()))


def _allocation_kind(value: object) -> str | None:
    """`kind` may be left out: uniform; a former name selects its kind (and warns, in the options)."""
    return current_kind(value.get("kind", "uniform")) if isinstance(value, dict) else getattr(value, "kind", None)


AllocationSpec = _union({a.kind: a.options for a in ALLOCATORS},
                        _tagged_by("kind", _allocation_kind, ALLOCATORS.names()))


class TargetSpec(Strict):
    # Compression ratio = 1 - (compressed params / dense params) over the counted matrices below.
    ratio: float = Field(gt=0.0, lt=1.0)
    # The projections of every decoder layer that are compressed and counted. Embeddings and lm_head
    # are never compressed nor counted. Empty (with a kv_cache part): only the KV cache is compressed,
    # the weights stay dense and `ratio` is not used.
    matrices: tuple[Projection, ...] = ALL_PROJECTIONS
    allocation: AllocationSpec = UniformAllocation()
    # A mixture of experts' gate/up. Unset: one input group per expert, whitened with the Gram of the
    # tokens routed to it. `shared`: all experts' gate/up of a layer in one group whitened with the union
    # Gram (every token of the layer once: Σ_e G_e / top-k); with a shared structure (cat, skip, skipcat)
    # one projection A for every expert and a B per expert.
    experts: Literal["shared"] | None = None

    @field_validator("matrices")
    @classmethod
    def _distinct(cls, matrices: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(matrices)) != len(matrices):
            raise ValueError("must be a list without repeats")
        return matrices


class CalibrationSpec(Strict):
    unhashed: ClassVar[frozenset[str]] = frozenset({"max_resident_mb"})  # where it spills, not what

    data: TextSource
    num_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0
    # Samples per forward pass; bounds activation memory, not the result.
    batch_size: int = Field(8, ge=1)
    # dtype of each chunk's x·xᵀ product; sums are float64 either way. float32 halves calibration
    # time on CPU (Gram relative difference ~3e-8 on SmolLM2); float64 for exactness studies.
    gram_product_dtype: Literal["float32", "float64"] = "float32"
    # Activations a shard holds in memory before spilling the rest to disk (inside output.dir), MB.
    max_resident_mb: int = Field(2048, ge=1)

    def sample(self) -> CalibrationSample:
        """The token windows this calibration reads (its data's content fingerprint included)."""
        return CalibrationSample.of(self.data, self.num_samples, self.seq_len, self.seed)


class RefineSpec(Strict):
    """fitting.refine: after a layer is fitted, a few Adam steps on its factors toward the dense layer's
    output — Σ‖layer′(X̂) − layer(X)‖² on the fitted calibration sequences, the block objective AA-SVD
    (arXiv 2604.02119) refines for 25 epochs — the factors at the start or at a check point kept by their
    held-out layer-output error (training: the factors move off the method's closed form)."""

    steps: int = Field(32, ge=1)
    lr: float = Field(1e-5, gt=0)  # Adam's peak rate: warm-up, then cosine to 0.1× (AA-SVD's schedule; its 1e-4 measured worse here)
    # Calibration sequences per step: each shard takes ⌈sequences / shards⌉ of its fitted ones (a shard of
    # held-out sequences only, none), so the step's batch follows the worker count.
    sequences: int = Field(4, ge=1)
    checks: int = Field(8, ge=1)  # held-out scorings, evenly spaced, the last after the last step


class FittingSpec(Strict):
    """Anchored fitting (methods/anchored.py): calibration and decomposition in one walk over the
    layers, each input group fitted to the dense outputs from the compressed-so-far model's inputs X̂:
    min ‖W X − W′ X̂‖² + λ ‖(W − W′) X‖². For whitened methods (svd_llm, cat, skip, skipcat).
    Fits the weight method's matrices; a KV method's factors (Palu) stay fitted to the dense inputs.
    The defaults (`fitting: {}`) keep the plain factors of every group but the layer's last projection
    (down_proj), which is fitted to the dense layer output from the compressed stream at a weight chosen on
    held-out sequences, then corrected: the setting measured best (docs/methods/anchored.md)."""

    kind: Literal["anchored"] = "anchored"
    # The plain term's weight w = λ / (1 + λ) in (1 − w) ‖W X − W′ X̂‖² + w ‖(W − W′) X‖²: 0 is AA-SVD's
    # anchored form, 1 the plain method. One value, or candidates each input group chooses among on
    # held-out calibration sequences (choose_on), e.g. [0, 0.2, 0.5, 0.8, 1]. Default: the plain factors
    # (down_proj's fit is output_mix's), which with it and the output correction measured best
    # (docs/methods/anchored.md).
    mix: tuple[float, ...] = Field((1.0,), min_length=1)
    # What the held-out choice of the weight minimises: "layer" (default), the layer's output error
    # ‖layer(X_h) − layer′(X̂_h)‖² with the candidate in place (the groups before it fitted, the rest
    # dense), which sees what attention's softmax and the MLP's gate make of the module's error (one
    # held-out forward of the layer per candidate); "module", each group's own anchored error
    # ‖W X_h − W′ X̂_h‖² summed over its modules — cheaper, but it prefers the anchored end and measured
    # worse than the plain factors (docs/methods/anchored.md).
    choose_on: Literal["module", "layer"] = "layer"
    # Calibration sequences (the sample's last) held out to choose the weight; fitted on the rest.
    # Unused with one weight and no output correction.
    holdout: int = Field(16, ge=1)
    # After a layer is fitted, its last projection's B (down_proj) refitted in closed form so the compressed
    # layer's output on X̂ matches the dense layer's on X — the drift the residual carries included — kept
    # as a blend with the fitted B chosen on the held-out sequences (or not at all). A projection whose
    # output does not reach the residual unchanged (Gemma's and OLMo 2's post-norms, Granite's scaled
    # residual) keeps its B.
    output_correction: bool = True
    # The same for o_proj, once its group is fitted, toward the dense residual after attention (before the
    # MLP is fitted). Off by default: measured worse than the down_proj correction alone (docs/methods/anchored.md).
    attention_correction: bool = False
    # The layer's last projection (down_proj) fitted to the dense layer output from the compressed stream —
    # the drift the residual carries included — mixed with its plain term, (1 − w) Σ‖e − W′x̂‖² + w ‖(W − W′)X‖²
    # (methods/anchored.py output_mixed_problem), w among these candidates chosen on the held-out
    # sequences' layer-output error. Default [0, 0.2, 0.5, 0.8, 1]: measured best at 20 % and 40 %
    # (docs/methods/anchored.md). null: that group is fitted as the others (mix); so is a projection whose
    # output does not reach the residual unchanged.
    output_mix: tuple[float, ...] | None = Field((0.0, 0.2, 0.5, 0.8, 1.0), min_length=1)
    # With output_mix: o_proj (the attention output group, when one projection whose output the layer adds
    # to its residual) fitted the same way toward the dense residual after attention, its weight among the
    # output_mix candidates chosen on the held-out *layer* output (the MLP still dense) — not on the residual
    # it was fitted to, the greedy choice that made attention_correction worse. Measured worse still
    # (docs/methods/anchored.md): off by default.
    attention_output_mix: bool = False
    # After each layer is fitted (and corrected), a local refinement of its factors (RefineSpec). Unset:
    # none — the closed forms only.
    refine: RefineSpec | None = None
    # How the fits and choices toward a dense residual (output_mix, the output corrections, the layer-output
    # choice, refine) count a token's squared error. Unset: as is. "relative": over the mean square of the
    # token's dense residual there (methods/anchored.py relative_weights), the scale the next RMSNorm
    # divides by — the few tokens whose residual is hundreds of times the others' no longer decide the fit.
    token_weights: Literal["relative"] | None = None

    @field_validator("mix", "output_mix")
    @classmethod
    def _weights(cls, mix: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if mix is None:
            return mix
        if any(not 0.0 <= value <= 1.0 for value in mix):
            raise ValueError(f"every weight must lie in [0, 1] (0: anchored, 1: the plain method), got {list(mix)}")
        if len(set(mix)) != len(mix):
            raise ValueError("must be a list without repeats")
        return mix

    @model_validator(mode="after")
    def _attention_output_mix_needs_candidates(self) -> "FittingSpec":
        if self.attention_output_mix and self.output_mix is None:
            raise ValueError("attention_output_mix takes its weights from output_mix, which is null: give it "
                             "candidates (e.g. output_mix: [0, 0.2, 0.5, 0.8, 1], the default)")
        return self

    @property
    def heldout(self) -> int:
        """Sequences held out: `holdout` when there is a choice to make, else none."""
        choices = len(self.mix) > 1 or len(self.output_mix or ()) > 1
        chosen = choices or self.output_correction or self.attention_correction or self.refine is not None
        return self.holdout if chosen else 0


# One list per registered evaluator (`evaluation: {perplexity: [...], zeroshot: [...], generation: [...]}`).
EvaluatorsSpec = create_model(
    "EvaluatorsSpec", __base__=Strict,
    **{evaluator.name: (tuple[evaluator.options, ...], ()) for evaluator in EVALUATORS})


class EvaluationSpec(EvaluatorsSpec):
    dense: bool = True  # also evaluate the uncompressed model, for the comparison table


def _names_differ(evaluation: Strict) -> None:
    for evaluator in EVALUATORS:
        names = [options.name for options in getattr(evaluation, evaluator.name)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"evaluation.{evaluator.name}: names must differ (their rows are labelled by "
                             f"name); repeated: {', '.join(repeated)}")


class S3Spec(Strict):
    """Artifacts in S3 (or any S3-compatible endpoint). Credentials: boto3's standard chain only."""

    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$")
    prefix: str = "rankfold"
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for infra/local-s3.sh
    region: str | None = None


class OutputSpec(Strict):
    # Local folder: job.json, report.json, the compressed checkpoint (model/), scratch space.
    dir: Path
    # Where stage artifacts (statistics, factors, checkpoint shards, manifest) live: inside `dir`
    # by default, or in S3.
    s3: S3Spec | None = None


class ExecutionSpec(Strict):
    """Where the stage work runs. Not part of the job's identity: the same job may resume elsewhere."""

    # local: in this process. ray: Ray tasks and actors — embedded (`ray.init()`) without an address.
    executor: Literal["local", "ray"] = "local"
    # A Ray cluster: "host:6379" or "ray://host:10001"; also from RAY_ADDRESS.
    address: str | None = None
    # Data-parallel shards of the calibration and evaluation sequences (one actor each).
    workers: int = Field(2, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    # Where each worker's tensor work runs: auto — its GPU when it has one, else the CPU; cpu; cuda — a GPU
    # or an error. On Ray a worker has a GPU only when it requests one (gpus_per_worker).
    device: DeviceName = "auto"
    # GPUs each Ray worker (shard actor or task) requests, at most 1 (a worker runs on one GPU: more GPUs, more
    # workers); a fraction shares one GPU among workers. The local executor ignores it (it runs in this
    # process, on its GPU when `device` finds one).
    gpus_per_worker: float = Field(0.0, ge=0.0, le=1.0)
    # Activations (hidden states between layers) each worker keeps on its GPU before pinned host memory
    # (calibration.max_resident_mb), then disk, MB. None: a quarter of the GPU memory free when the worker
    # starts (of its share, with a fractional gpus_per_worker). Only where the layers run on a GPU.
    device_activations_mb: int | None = Field(None, ge=0)

    @property
    def device_activations_bytes(self) -> int | None:
        return None if self.device_activations_mb is None else self.device_activations_mb << 20

    @model_validator(mode="after")
    def _gpus_fit_the_device(self) -> "ExecutionSpec":
        if self.gpus_per_worker and self.device == "cpu":
            raise ValueError(f"execution.gpus_per_worker = {self.gpus_per_worker:g} with execution.device cpu: the "
                             "GPUs would be held and unused (use device auto or cuda, or gpus_per_worker 0)")
        if self.device_activations_mb is not None and self.device == "cpu":
            raise ValueError(f"execution.device_activations_mb = {self.device_activations_mb} with execution.device "
                             "cpu: there is no GPU to keep activations on (calibration.max_resident_mb is the host "
                             "budget)")
        if self.device == "cuda" and self.executor == "ray" and not self.gpus_per_worker:
            raise ValueError("execution.device cuda on Ray needs execution.gpus_per_worker > 0: Ray gives a worker a "
                             "GPU only when it requests one")
        return self


# Every registered KV method's options, tagged by `name`.
KVCacheSpec = _union({method.name: method.options for method in KV_METHODS},
                     _tagged_by("kv_cache.name", _method_name, KV_METHODS.names()))


class JobSpec(Strict):
    version: Literal[1] = SPEC_VERSION
    model: ModelSpec
    method: MethodSpec
    target: TargetSpec
    calibration: CalibrationSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    output: OutputSpec
    execution: ExecutionSpec = ExecutionSpec()
    # A compressed KV cache (a registered KV method: palu) beside the weight method; None: the model's own.
    kv_cache: KVCacheSpec | None = None
    # How the factors are fitted; None: each layer to its own dense inputs (the method as published).
    fitting: FittingSpec | None = None

    @model_validator(mode="after")
    def _fitting_applies(self) -> "JobSpec":
        fitting, method = self.fitting, METHODS.get(self.method.name)
        if fitting is None:
            return self
        if not method.whitened or method.reads:
            whitened = ", ".join(m.name for m in METHODS if m.whitened and not m.reads)
            raise ValueError(f"fitting.kind anchored fits whitened methods ({whitened}); method.name is "
                             f"{self.method.name!r}")
        if fitting.heldout >= self.calibration.num_samples:
            raise ValueError(f"fitting.holdout {fitting.holdout} leaves no calibration sequence to fit: "
                             f"calibration.num_samples is {self.calibration.num_samples}")
        return self

    @model_validator(mode="after")
    def _kv_projections_are_the_caches(self) -> "JobSpec":
        if not self.target.matrices and self.kv_cache is None:
            raise ValueError("target.matrices is empty: name the projections to compress (an empty list is a "
                             "cache-only job, which needs a kv_cache part)")
        taken = [p for p in ("k_proj", "v_proj", "qkv_proj") if p in self.target.matrices]  # qkv_proj: Phi-3's
        if self.kv_cache is not None and taken:
            kept = [m for m in self.target.matrices if m not in taken]
            raise ValueError(f"kv_cache factors k_proj and v_proj itself: leave {', '.join(taken)} out of "
                             f"target.matrices (e.g. matrices: [{', '.join(kept)}])")
        return self

    @model_validator(mode="after")
    def _distinct_evaluation_names(self) -> "JobSpec":
        _names_differ(self.evaluation)
        return self

    @model_validator(mode="after")
    def _allocation_fits(self) -> "JobSpec":
        allocation, method = self.target.allocation, METHODS.get(self.method.name)
        if method.allocations is not None and allocation.kind not in method.allocations:
            raise ValueError(f"target.allocation.kind {allocation.kind!r} does not apply to method.name "
                             f"{method.name!r}; it takes {', '.join(repr(k) for k in method.allocations)}")
        ALLOCATORS.get(allocation.kind).check_spec(allocation, method, self.calibration.num_samples)
        return self

    def canonical_json(self) -> str:
        """Stable serialisation of what the job computes — not where it runs, nor how much memory it
        may hold before spilling (`execution`, `calibration.max_resident_mb`): its hash is the job id."""
        exclude = {"execution": True, "calibration": {"max_resident_mb"}}
        if self.kv_cache is None:  # jobs from before the kv_cache part keep their ids
            exclude["kv_cache"] = True
        if self.target.experts is None:  # and from before target.experts
            exclude["target"] = {"experts"}
        if self.fitting is None:  # and from before fitting
            exclude["fitting"] = True
        else:  # and from before fitting.output_mix, fitting.refine, fitting.token_weights
            absent = {name for name in ("output_mix", "refine", "token_weights") if getattr(self.fitting, name) is None}
            absent |= {"attention_output_mix"} if not self.fitting.attention_output_mix else set()
            if absent:
                exclude["fitting"] = absent
        data = self.model_dump(mode="json", exclude=exclude)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


class EvalSpec(Strict):
    """Evaluate an existing model, no compression (`rankfold eval`): `model.source` is a rankfold
    checkpoint folder, `store:checkpoints/<digest>` (a job's checkpoint in this spec's artifact
    store), a Hugging Face folder, a GGUF or a built-in name (its dense model). A spec without
    `method` is one of these.

        model: {source: runs/smollm2-svdllm-20/model}
        evaluation: {zeroshot: [{name: suite, tasks: {piqa: {path: ../shared/data/piqa/valid.jsonl}}}]}
        output: {dir: runs/eval-svdllm-20}
    """

    version: Literal[1] = SPEC_VERSION
    model: ModelSpec
    evaluation: EvaluatorsSpec
    output: OutputSpec
    execution: ExecutionSpec = ExecutionSpec()

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> "EvalSpec":
        if not any(getattr(self.evaluation, e.name) for e in EVALUATORS):
            raise ValueError(f"evaluation: no entries (give at least one of: {', '.join(EVALUATORS.names())})")
        _names_differ(self.evaluation)
        return self

    def canonical_json(self) -> str:
        """What the evaluation computes, not where it runs: its hash is the run's id."""
        return json.dumps(self.model_dump(mode="json", exclude={"execution"}), sort_keys=True, separators=(",", ":"))


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid job spec {origin}:"]
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        value = item.get("input")
        shown = redact(json.dumps(value, default=str)) if not isinstance(value, dict) else "{...}"
        lines.append(f"  {field or '<root>'} = {shown}: {item['msg']}")
    return "\n".join(lines)


def parse_spec(data: object, origin: str = "<dict>") -> JobSpec:
    """Validate a mapping as a JobSpec; SpecError names every bad field and its value (a URL with
    credentials is one: the field is named, the secret masked)."""
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec {origin}: expected a mapping at the top level, got {type(data).__name__}")
    _refuse_credentials(data, origin)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, origin)) from None


def parse_any_spec(data: object, origin: str = "<dict>") -> JobSpec | EvalSpec:
    """A compression job (a mapping with `method`) or an evaluation-only spec (without)."""
    if isinstance(data, dict) and "method" not in data:
        _refuse_credentials(data, origin, kind="evaluation spec")
        try:
            return EvalSpec.model_validate(data)
        except ValidationError as err:
            raise SpecError(_format_validation_error(err, origin).replace("job spec", "evaluation spec", 1)) from None
    return parse_spec(data, origin)


def load_spec(path: str | Path) -> JobSpec:
    """Read a YAML or JSON job spec from disk (JSON is YAML, so one parser serves both). SpecError when
    the file is missing, not YAML, gives a key twice in one mapping (naming it and both lines) or is
    not a valid spec."""
    return parse_spec(_read(path), origin=str(path))


def load_any_spec(path: str | Path) -> JobSpec | EvalSpec:
    """Read a compression job or an evaluation-only spec (`parse_any_spec`) from disk."""
    return parse_any_spec(_read(path), origin=str(path))


def _read(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"job spec file not found: {path}")
    try:
        return load_yaml(path.read_text())
    except DuplicateKeyError as err:
        raise SpecError(f"job spec {path}: key {err.key!r} is given twice in one mapping, at line {err.first_line} "
                        f"and line {err.line}; keep one (a repeated key would silently replace the first)") from None
    except yaml.YAMLError as err:
        raise SpecError(f"job spec {path} is not valid YAML/JSON: {err}") from None


def _refuse_credentials(data: object, origin: str, field: str = "", kind: str = "job spec") -> None:
    """A URL anywhere in the spec (output.s3.endpoint_url, execution.address, ...) must not carry
    credentials: they would be stored in job.json and report.json and echoed in messages. S3
    credentials come from boto3's standard chain, a cluster's from its own configuration."""
    if isinstance(data, dict):
        for key, value in data.items():
            _refuse_credentials(value, origin, f"{field}.{key}" if field else str(key), kind)
    elif isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            _refuse_credentials(value, origin, f"{field}[{index}]", kind)
    elif isinstance(data, str) and has_url_credentials(data):
        raise SpecError(f"invalid {kind} {origin}:\n  {field} = {redact(data)!r}: credentials in a URL are "
                        f"refused (they would be stored in job.json and printed); S3 credentials come from "
                        f"boto3's standard chain (AWS_ACCESS_KEY_ID / ~/.aws / instance role)")
