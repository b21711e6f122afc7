"""The run configuration: one pydantic model, a section per stage, validated before any work starts.

Relative paths in a YAML file are resolved against the file's folder, so a config can sit beside
its corpus and be run from anywhere. Every model forbids unknown keys: a typo is an error, not a
silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.lease import DEFAULT_TTL_SECONDS
from infra.paths import is_remote_url
from model.presets import HUBERT_CONFIGS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusConfig(_Section):
    source: str = Field(
        description="A folder (searched recursively for .wav/.flac), a fairseq .tsv manifest "
        "(first line: root folder; then relpath<TAB>num_samples) or a NeMo-style .jsonl manifest "
        "(audio_filepath, optional duration, speaker). Local path or s3:// URL."
    )
    alignments: str | None = Field(
        default=None,
        description="Optional folder of <utt_id>.tsv phone alignments (header: start_sec end_sec phone).",
    )
    min_seconds: float = Field(
        default=0.1, ge=0.0, description="Shorter files are rejected at intake (reported, not fatal)."
    )
    max_seconds: float | None = Field(
        default=None, gt=0.0, description="Longer files are rejected at intake; null keeps all."
    )
    valid: float | str | None = Field(
        default=None,
        description="The validation split, held out of k-means fitting and training (its utterances still "
        "get labels, from the training centroids): a fraction in (0, 0.5] of the utterances, chosen by a "
        "seeded hash of each utterance id (the same ids whatever the corpus order or size), or a listing "
        "of validation ids: a text file with one id per line, or a fairseq .tsv / NeMo .jsonl whose file "
        "names give the ids. Null: no validation split.",
    )
    valid_seed: int = Field(default=0, ge=0, description="Seed of the hash that picks a fractional validation split.")

    @model_validator(mode="after")
    def _max_above_min(self) -> CorpusConfig:
        if self.max_seconds is not None and self.max_seconds <= self.min_seconds:
            raise ValueError(f"max_seconds ({self.max_seconds}) must exceed min_seconds ({self.min_seconds})")
        return self

    @field_validator("valid")
    @classmethod
    def _valid_is_a_fraction_or_a_listing(cls, valid: float | str | None) -> float | str | None:
        if isinstance(valid, float) and not 0.0 < valid <= 0.5:
            raise ValueError(f"a validation fraction must be in (0, 0.5], got {valid}")
        if isinstance(valid, str) and not valid.strip():
            raise ValueError("give a fraction in (0, 0.5] or the path of a listing of validation ids")
        return valid

    @model_validator(mode="after")
    def _seed_only_with_a_fraction(self) -> CorpusConfig:
        if self.valid_seed != 0 and not isinstance(self.valid, float):
            raise ValueError(
                f"valid_seed is {self.valid_seed}, but it only picks a fractional validation split and corpus.valid "
                f"is {self.valid!r}, not a fraction"
            )
        return self

    @property
    def has_valid_split(self) -> bool:
        return self.valid is not None


class DaskConfig(_Section):
    address: str | None = Field(
        default=None, description="Scheduler address (tcp://host:port); null (and no scheduler_file) starts a LocalCluster."
    )
    scheduler_file: str | None = Field(
        default=None,
        description="The JSON file `dask scheduler --scheduler-file` writes (on a shared file system, as on "
        "Slurm); instead of address.",
    )
    n_workers: int | None = Field(
        default=None, ge=1, description="LocalCluster worker processes; null: one per CPU core."
    )
    threads_per_worker: int = Field(default=1, ge=1, description="LocalCluster threads per worker.")
    memory_limit: str = Field(default="auto", description="LocalCluster memory limit per worker.")

    @model_validator(mode="after")
    def _one_way_to_the_scheduler(self) -> DaskConfig:
        if self.address is not None and self.scheduler_file is not None:
            raise ValueError("give dask.address or dask.scheduler_file, not both")
        return self

    @property
    def is_external(self) -> bool:
        return self.address is not None or self.scheduler_file is not None


class LeaseConfig(_Section):
    ttl_seconds: float = Field(
        default=DEFAULT_TTL_SECONDS,
        ge=1.0,
        le=86400.0,
        description="A run's lease (one writer per run) is renewed every ttl_seconds/4; a lease not renewed for "
        "ttl_seconds belonged to a writer that died and is taken over. Machines' clocks must agree to well within it.",
    )


STORAGE_FIELDS = ("keep", "dtype")
"""FeaturesConfig fields added after runs existed: left out of the stage key at their defaults."""


class FeaturesConfig(_Section):
    kind: Literal["mfcc", "hubert"] = Field(
        description="mfcc: 39-dim Kaldi MFCC + deltas at 100 frames/s (iteration 1); "
        "hubert: a transformer layer of the previous iteration's model (50 frames/s)."
    )
    layer: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default=None,
        description="Transformer layer for kind=hubert (1-based), or 'auto': the layer with the highest PNMI "
        "in the previous iteration's layer profile (needs corpus.alignments).",
    )
    chunk_frames: int | None = Field(
        default=None,
        ge=256,
        description="Frames per Zarr chunk, which is also the unit one Dask task writes and resumes; "
        "null picks one from the corpus size.",
    )
    keep: Literal["all", "sample"] = Field(
        default="all",
        description="all: the features store holds every utterance's frames. sample: it holds only the "
        "training utterances k-means fits on (about kmeans.sample_fraction of the training frames, capped "
        "by kmeans.max_frames, chosen whole by a seeded hash of their ids, seed kmeans.seed), and the label "
        "stage computes every utterance's features again on the fly and writes only labels: the labels "
        "equal those of 'all'. It needs a sample smaller than the corpus (sample_fraction below 1 or a "
        "max_frames): a sample of everything would store every training frame and compute it twice.",
    )
    dtype: Literal["float32", "float16"] = Field(
        default="float32",
        description="The features store's values: float16 halves its bytes; k-means and labels compute in "
        "float32 from them. The label stage measures on a fixed sample of chunks how many frames keep their "
        "label against float32 features (metrics.float16_agreement of its record) and warns below 99%.",
    )

    @model_validator(mode="after")
    def _layer_matches_kind(self) -> FeaturesConfig:
        if self.kind == "hubert" and self.layer is None:
            raise ValueError("kind 'hubert' needs a layer (e.g. layer: 6)")
        if self.kind == "mfcc" and self.layer is not None:
            raise ValueError("kind 'mfcc' takes no layer")
        return self

    def key_dump(self) -> dict[str, Any]:
        """The section as the feature stage's key takes it: the storage settings only where they are
        not their defaults, so that configs from before they existed keep their keys."""
        dumped = self.model_dump()
        for name in STORAGE_FIELDS:
            if dumped[name] == type(self).model_fields[name].default:
                del dumped[name]
        return dumped


class KMeansConfig(_Section):
    k: int = Field(ge=2, le=32767, description="Number of clusters (label vocabulary size).")
    sample_fraction: float = Field(default=1.0, gt=0.0, le=1.0, description="Share of frames fitted on.")
    max_frames: int | None = Field(default=None, ge=1, description="Cap on frames fitted on.")
    max_iter: int = Field(default=100, ge=1, description="Lloyd iterations at most.")
    seed: int = Field(default=0, ge=0)
    init: Literal["k-means++", "random"] = "k-means++"

    @model_validator(mode="after")
    def _enough_frames_for_k(self) -> KMeansConfig:
        if self.max_frames is not None and self.max_frames < self.k:
            raise ValueError(f"max_frames {self.max_frames} is fewer than k={self.k}: k-means needs at least k frames")
        return self


class LayerProfileConfig(_Section):
    """After training, every transformer layer is clustered and measured on a fixed sample."""

    enabled: bool = Field(default=True, description="Measure every layer after training.")
    utterances: int = Field(default=100, ge=1, description="Utterances in the sample (chosen by a seeded hash of their ids).")
    k: int = Field(default=100, ge=2, le=32767, description="Clusters per layer (the paper compares layers at k=100).")
    seed: int = Field(default=0, ge=0)


class TrainConfig(_Section):
    model: Literal["tiny", "base", "large", "xlarge"] = Field(default="base", description="Architecture preset.")
    steps: int = Field(default=400_000, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(default=5e-4, gt=0, le=1, description="Peak learning rate (AdamW).")
    warmup_steps: int | None = Field(default=None, ge=1, description="Linear warm-up; null: 8% of steps.")
    weight_decay: float = Field(default=0.01, ge=0)
    clip_norm: float = Field(default=10.0, gt=0, description="Gradient norm clipping.")
    accumulation: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    max_batch_seconds: float = Field(default=87.5, gt=0, description="Audio per batch per process (fairseq: 1.4 M samples).")
    max_sample_seconds: float = Field(default=15.625, gt=0, description="Random crop length (fairseq: 250,000 samples).")
    unmasked_weight: float = Field(default=0.0, ge=0, description="Loss weight of unmasked frames.")
    checkpoint_every: int = Field(default=1000, ge=1, description="Steps between checkpoints.")
    log_every: int = Field(default=100, ge=1, description="Steps between log lines.")
    valid_every: int | None = Field(
        default=None,
        ge=1,
        description="Steps between validation passes (loss and masked accuracy on the validation split, "
        "with fixed crops and masks), and at the last step; null: every checkpoint_every steps. Needs "
        "corpus.valid.",
    )
    weights_for_next: Literal["best", "final"] | None = Field(
        default=None,
        description="Which weights the next iteration takes features (and a warm start) from: best (lowest "
        "validation loss; needs corpus.valid) or final (the weights after the last step); null: best when "
        "there is a validation split, final otherwise.",
    )
    init: Literal["cold", "warm"] = Field(
        default="cold",
        description="cold: fresh weights, as the paper; warm: start from the previous iteration's weights "
        "(those it chose for the next iteration), except the label embeddings and final projection, which "
        "depend on the labels. Warm needs the previous iteration to train the same model.",
    )
    seed: int = Field(default=0, ge=0)
    nproc: int = Field(default=1, ge=1, description="Training processes per machine (one per GPU) under torchrun.")
    nnodes: int = Field(
        default=1,
        ge=1,
        description="Training machines. Over 1, torchrun runs on that many workers of the external Dask "
        "cluster that have the `train_node` resource (`dask worker ... --resources train_node=1`), "
        "which rendezvous at the first one's host on `rdzv_port`.",
    )
    rdzv_port: int = Field(
        default=29400, ge=1, le=65535, description="Port of torchrun's c10d rendezvous on the first training machine."
    )
    bf16: bool = Field(default=True, description="bf16 autocast on GPU (ignored on CPU).")
    prefetch_batches: int = Field(
        default=2,
        ge=0,
        description="Batches read and cropped ahead of the step on background threads, so steps do not wait "
        "for storage (0: each batch is read in the step). Changes no number trained.",
    )
    profile: LayerProfileConfig = Field(
        default_factory=LayerProfileConfig, description="The layer profile measured after training."
    )

    @model_validator(mode="after")
    def _batch_holds_a_crop(self) -> TrainConfig:
        if self.max_batch_seconds < self.max_sample_seconds:
            raise ValueError(
                f"max_batch_seconds ({self.max_batch_seconds}) must be at least max_sample_seconds ({self.max_sample_seconds})"
            )
        return self


class QualityGateConfig(_Section):
    min_pnmi_gain: float = Field(
        ge=-1.0, le=1.0,
        description="Stop the run before training an iteration whose labels' PNMI is not at least this much "
        "above the previous iteration's (0: any regression stops it).",
    )


class IterationConfig(_Section):
    features: FeaturesConfig
    kmeans: KMeansConfig
    train: TrainConfig | None = Field(
        default=None,
        description="Training of this iteration's model. Only the last iteration may leave it out: it then "
        "runs features, k-means and labels on the previous model, which ends a run with that model's units.",
    )

    @model_validator(mode="after")
    def _a_kept_sample_is_smaller_than_the_corpus(self) -> IterationConfig:
        kmeans = self.kmeans
        if self.features.keep == "sample" and kmeans.sample_fraction >= 1.0 and kmeans.max_frames is None:
            raise ValueError(
                "features.keep 'sample' stores only the frames k-means fits on, and kmeans.sample_fraction 1.0 "
                "with no max_frames fits on every training frame: lower sample_fraction (the paper: 0.1), set "
                "max_frames, or keep 'all'"
            )
        return self


class PretrainConfig(_Section):
    run: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        max_length=128,
        description="Run name: the folder under the store that holds every artifact of this run.",
    )
    store: str = Field(description="Artifact store root: a local folder or an s3://bucket/prefix URL.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for s3:// paths (endpoint_url, ...). Prefer credentials from the "
        "environment or ~/.aws: values here are never logged, but they are stored in Prefect's parameters.",
    )
    corpus: CorpusConfig
    dask: DaskConfig = Field(default_factory=DaskConfig)
    quality_gate: QualityGateConfig | None = Field(
        default=None,
        description="Optional: refuse to train on labels that are not better than the previous iteration's "
        "(needs corpus.alignments). Without it a regression is a warning in the report and the CLI's table.",
    )
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    iterations: list[IterationConfig] = Field(min_length=1)

    @field_validator("iterations")
    @classmethod
    def _first_iteration_is_mfcc(cls, iterations: list[IterationConfig]) -> list[IterationConfig]:
        if iterations[0].features.kind != "mfcc":
            raise ValueError("iteration 1 must use features.kind 'mfcc': there is no earlier model to take layers from")
        return iterations

    @model_validator(mode="wrap")
    @classmethod
    def _only_the_last_iteration_may_skip_training(cls, data: Any, handler: Any) -> PretrainConfig:
        """A missing train section anywhere but last is reported at its own field path."""
        config = handler(data)
        missing = [number for number, iteration in enumerate(config.iterations[:-1]) if iteration.train is None]
        if missing:
            raise ValidationError.from_exception_data(
                cls.__name__,
                [
                    {
                        "type": "value_error",
                        "loc": ("iterations", number, "train"),
                        "input": None,
                        "ctx": {"error": ValueError("only the last iteration may leave train out: a later iteration reads its model")},
                    }
                    for number in missing
                ],
            )
        return config

    @model_validator(mode="after")
    def _phone_measures_need_alignments(self) -> PretrainConfig:
        if self.corpus.alignments is not None:
            return self
        if self.quality_gate is not None:
            raise ValueError("quality_gate compares PNMI, which needs corpus.alignments")
        for number, iteration in enumerate(self.iterations):
            if iteration.features.layer == "auto":
                raise ValueError(
                    f"iterations.{number}.features.layer 'auto' picks the layer with the highest PNMI, which needs corpus.alignments"
                )
        return self

    @model_validator(mode="after")
    def _auto_layers_need_a_profile(self) -> PretrainConfig:
        for number, iteration in enumerate(self.iterations[1:], start=1):
            previous = self.iterations[number - 1].train
            if iteration.features.layer == "auto" and previous is not None and not previous.profile.enabled:
                raise ValueError(
                    f"iterations.{number}.features.layer 'auto' needs iterations.{number - 1}.train.profile.enabled"
                )
        return self

    @model_validator(mode="after")
    def _validation_settings_need_a_split(self) -> PretrainConfig:
        if self.corpus.has_valid_split:
            return self
        for number, iteration in enumerate(self.iterations):
            if iteration.train is None:
                continue
            if iteration.train.valid_every is not None:
                raise ValueError(f"iterations.{number}.train.valid_every: there is no validation split to validate on (set corpus.valid)")
            if iteration.train.weights_for_next == "best":
                raise ValueError(
                    f"iterations.{number}.train.weights_for_next: 'best' is chosen by validation loss, and there "
                    "is no validation split (set corpus.valid, or choose 'final')"
                )
        return self

    @model_validator(mode="after")
    def _warm_start_needs_the_same_model_before(self) -> PretrainConfig:
        for number, iteration in enumerate(self.iterations):
            if iteration.train is None or iteration.train.init != "warm":
                continue
            if number == 0:
                raise ValueError("iterations.0.train.init: 'warm' starts from the previous iteration's weights, and iteration 1 has none")
            previous = None if self.iterations[number - 1].train is None else self.iterations[number - 1].train.model
            if previous != iteration.train.model:
                raise ValueError(
                    f"iterations.{number}.train.init: 'warm' needs iteration {number} to train the same model "
                    f"{iteration.train.model!r}; it trains {previous!r}"
                )
        return self

    def weights_for_next(self, iteration: int) -> Literal["best", "final"]:
        """Which of iteration `iteration`'s weights feed the next iteration (train.weights_for_next resolved)."""
        chosen = self.iterations[iteration - 1].train.weights_for_next
        if chosen is not None:
            return chosen
        return "best" if self.corpus.has_valid_split else "final"

    @model_validator(mode="after")
    def _several_training_machines_need_a_cluster(self) -> PretrainConfig:
        for number, iteration in enumerate(self.iterations, start=1):
            if iteration.train is not None and iteration.train.nnodes > 1 and not self.dask.is_external:
                raise ValueError(
                    f"iterations.{number - 1}.train.nnodes is {iteration.train.nnodes}, which needs an external "
                    "Dask cluster (dask.address or dask.scheduler_file) with that many `train_node` workers; a LocalCluster is one machine"
                )
        return self

    @model_validator(mode="after")
    def _layers_exist_in_the_previous_model(self) -> PretrainConfig:
        """A later iteration's layer must exist in the preset the iteration before trains: known now, not after hours."""
        problems = []
        for index, (previous, iteration) in enumerate(zip(self.iterations, self.iterations[1:]), start=1):
            if previous.train is None:
                continue  # refused with its own field path: only the last iteration may leave train out
            layer, preset = iteration.features.layer, previous.train.model
            layers = HUBERT_CONFIGS[preset].encoder_num_layers
            if iteration.features.kind == "hubert" and isinstance(layer, int) and layer > layers:
                problems.append(
                    f"iterations.{index}.features.layer: {layer} exceeds the {layers} layers of iteration {index}'s '{preset}' model"
                )
        if problems:
            raise ValueError("\n  ".join(problems))
        return self


class ConfigError(ValueError):
    """An invalid configuration; the message lists every problem with its field path."""


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: `field.path: reason`, so users see all mistakes at once."""
    lines = [f"invalid configuration in {source}:"]
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"])
        if not path and problem["type"] == "value_error":  # checks across sections name their fields themselves
            lines.append(f"  {problem['ctx']['error']}")
        else:
            lines.append(f"  {path or '(top level)'}: {problem['msg']}")
    return "\n".join(lines)


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Paths in a config file are relative to the file, not to the shell's working folder."""

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value and not is_remote_url(value) and not Path(value).is_absolute():
            return str((base / value).resolve())
        return value

    resolved = dict(raw)
    if "store" in resolved:
        resolved["store"] = resolve(resolved["store"])
    corpus = resolved.get("corpus")
    if isinstance(corpus, dict):
        resolved["corpus"] = {**corpus, **{k: resolve(corpus[k]) for k in ("source", "alignments", "valid") if k in corpus}}
    dask = resolved.get("dask")
    if isinstance(dask, dict) and dask.get("scheduler_file"):
        resolved["dask"] = {**dask, "scheduler_file": resolve(dask["scheduler_file"])}
    return resolved


def load_config(path: str | Path) -> PretrainConfig:
    """Read and validate a YAML config; raises ConfigError naming every invalid field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(raw).__name__}")
    try:
        return PretrainConfig.model_validate(_resolve_relative_paths(raw, path.parent.resolve()))
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, str(path))) from error
