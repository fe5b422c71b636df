"""The job spec: everything a compression run depends on, as strict pydantic models.

A spec is data. Every model forbids unknown fields, so a typo in a YAML file is an error naming the
field, never a silently ignored option. Relative paths are resolved against the current working
directory (run `rankfold` from the folder the spec's paths are written for).

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
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SPEC_VERSION = 1

Projection = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SpecError(ValueError):
    """A job spec that cannot run: names the field, the value and what is wrong."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    # A Hugging Face folder with (sharded) safetensors, a .gguf file, or a built-in name (smollm2-135m).
    source: str
    # dtype of the compressed factors and of every forward pass. fp16 matmuls are ~100x slower on CPU.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class SvdOptions(Strict):
    """Plain truncated SVD of W (no calibration data used in the math, but statistics are still collected)."""

    name: Literal["svd"]


class AsvdOptions(Strict):
    """ASVD: SVD of W·D with D = diag(mean|x|)^alpha (arXiv:2312.05821)."""

    name: Literal["asvd"]
    alpha: float = Field(0.5, gt=0.0, le=2.0)


class SvdLlmOptions(Strict):
    """SVD-LLM: truncation-aware whitening, SVD of W·S with S the Cholesky factor of X Xᵀ (arXiv:2403.07378)."""

    name: Literal["svd_llm"]


class _SkipCatBase(Strict):
    # Guard on cond₂(A₁) of every skip block: above it the job stops with an error naming the matrix
    # (column-pivoted QR keeps it small; a large value means fp16/bf16 forward would lose accuracy).
    max_condition: float = Field(1e4, gt=1.0)


class SkipCatOptions(_SkipCatBase):
    """SkipCat: whitened shared projection per input group (q/k/v; gate/up) + block skipping."""

    name: Literal["skipcat"]


class CatOptions(_SkipCatBase):
    """Ablation: the shared projection only (no skipping)."""

    name: Literal["cat"]


class SkipOptions(_SkipCatBase):
    """Ablation: block skipping on each matrix alone (no sharing)."""

    name: Literal["skip"]


# Methods whose truncation error is the whitened spectrum's tail (the Fisher allocator trades it).
WHITENED_METHODS = ("svd_llm", "cat", "skip", "skipcat")

MethodSpec = Annotated[Union[SvdOptions, AsvdOptions, SvdLlmOptions, SkipCatOptions, CatOptions, SkipOptions],
                       Field(discriminator="name")]


class AllocationSpec(Strict):
    """How the parameter budget is split over the compressed matrices."""

    # uniform: every matrix keeps the same fraction of its parameters. fisher (FLRA): one global
    # budget; ranks go where the dense model's loss is most sensitive, from each matrix's empirical
    # Fisher score and its whitened spectrum (needs a whitened method: svd_llm, cat, skip, skipcat).
    kind: Literal["uniform", "fisher"] = "uniform"
    # Calibration sequences the Fisher pass uses (the first ones of the calibration sample) and how
    # many make one batch: F = mean over batches of Σ (∂ℒ_batch/∂W)².
    fisher_samples: int = Field(32, ge=1)
    fisher_batch_size: int = Field(1, ge=1)
    # No matrix gets fewer than this fraction of its full rank min(m, n).
    min_rank_fraction: float = Field(0.01, ge=0.0, lt=1.0)


class TargetSpec(Strict):
    # Compression ratio = 1 - (compressed params / dense params) over the counted matrices below.
    ratio: float = Field(gt=0.0, lt=1.0)
    # The projections of every decoder layer that are compressed and counted. Embeddings and lm_head
    # are never compressed nor counted.
    matrices: tuple[Projection, ...] = ALL_PROJECTIONS
    allocation: AllocationSpec = AllocationSpec()

    @field_validator("matrices")
    @classmethod
    def _distinct(cls, matrices: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(matrices)) != len(matrices) or not matrices:
            raise ValueError("must be a non-empty list without repeats")
        return matrices


class TextSource(Strict):
    """Text from a local file (.txt, or .jsonl with a text field) or a dataset name (needs a reachable hub)."""

    path: Path | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    # Rows (jsonl records, dataset rows, or a text file's lines when lines_as_rows) are joined with
    # this separator; WikiText-2 perplexity is conventionally measured on rows joined with "\n\n".
    lines_as_rows: bool = False
    row_separator: str = "\n\n"

    @model_validator(mode="after")
    def _exactly_one(self) -> "TextSource":
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'path' (a local file) or 'dataset' (a dataset name)")
        return self

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"dataset {self.dataset}" + (f"/{self.dataset_config}" if self.dataset_config else "") + f" [{self.split}]"


class CalibrationSpec(Strict):
    data: TextSource
    num_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0
    # Samples per forward pass; bounds activation memory, not the result.
    batch_size: int = Field(8, ge=1)
    # dtype of each chunk's x·xᵀ product; sums are float64 either way. float32 halves calibration
    # time on CPU (Gram relative difference ~3e-8 on SmolLM2); float64 for exactness studies.
    gram_product_dtype: Literal["float32", "float64"] = "float32"
    # Where layer activations are spilled when they exceed `max_resident_mb` (default: inside output.dir).
    max_resident_mb: int = Field(2048, ge=1)


class PerplexitySpec(Strict):
    name: str = Field(min_length=1)
    data: TextSource
    # Non-overlapping windows of this many tokens.
    window: int = Field(2048, ge=8)
    # Token budget: evaluate the first max_tokens tokens (whole windows); None = the whole text.
    max_tokens: int | None = Field(32768, ge=8)
    batch_size: int = Field(1, ge=1)


class EvaluationSpec(Strict):
    perplexity: tuple[PerplexitySpec, ...] = ()
    dense: bool = True  # also evaluate the uncompressed model, for the comparison table


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


class JobSpec(Strict):
    version: Literal[1] = SPEC_VERSION
    model: ModelSpec
    method: MethodSpec
    target: TargetSpec
    calibration: CalibrationSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    output: OutputSpec
    execution: ExecutionSpec = ExecutionSpec()

    @model_validator(mode="after")
    def _allocation_fits(self) -> "JobSpec":
        allocation = self.target.allocation
        if allocation.kind == "fisher":
            if self.method.name not in WHITENED_METHODS:
                raise ValueError(f"target.allocation.kind 'fisher' needs a whitened method "
                                 f"({', '.join(WHITENED_METHODS)}), not method.name {self.method.name!r}")
            if allocation.fisher_samples > self.calibration.num_samples:
                raise ValueError(f"target.allocation.fisher_samples = {allocation.fisher_samples} exceeds "
                                 f"calibration.num_samples = {self.calibration.num_samples}")
        return self

    def canonical_json(self) -> str:
        """Stable serialisation of what the job computes (not where it runs); its hash is the job id."""
        return json.dumps(self.model_dump(mode="json", exclude={"execution"}), sort_keys=True, separators=(",", ":"))


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid job spec {origin}:"]
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        value = item.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        lines.append(f"  {field or '<root>'} = {shown}: {item['msg']}")
    return "\n".join(lines)


def parse_spec(data: object, origin: str = "<dict>") -> JobSpec:
    """Validate a mapping as a JobSpec; SpecError names every bad field and its value."""
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec {origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, origin)) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a YAML or JSON job spec from disk (JSON is YAML, so one parser serves both)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"job spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"job spec {path} is not valid YAML/JSON: {err}") from None
    return parse_spec(data, origin=str(path))
