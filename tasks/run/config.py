"""The run configuration: one pydantic model, validated before any work starts.

The run-level sections (the corpus, which is intake's section, the Dask cluster, the lease, the
quality gate) are here, and the checks across sections; each iteration's stage sections are
tasks/run/sections.py's. Relative paths in a YAML file are resolved against the file's folder,
so a config can sit beside its corpus and be run from anywhere. Every model forbids unknown keys:
a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from infra.lease import DEFAULT_TTL_SECONDS
from infra.paths import is_remote_url
from model.presets import HUBERT_CONFIGS
from tasks.run.keys import AddedLater, OutputNeutral
from tasks.run.sections import IterationConfig, Section

CREDENTIAL_KEYS = frozenset(
    {
        "key", "secret", "token", "password", "session_token", "access_key", "secret_key",
        "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
        "account_key", "sas_token", "client_secret", "connection_string", "credentials",
    }
)
"""Option names (at any depth of storage_options, e.g. client_kwargs.aws_secret_access_key) that hold credentials."""


def split_credentials(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options without credentials, the credentials), nested dicts split alike."""
    public: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    for name, value in options.items():
        if name.lower() in CREDENTIAL_KEYS:
            secret[name] = value
        elif isinstance(value, dict):
            public[name], inner = split_credentials(value)
            if inner:
                secret[name] = inner
        else:
            public[name] = value
    return public, secret


def merged_options(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` added, nested dicts merged (client_kwargs from both)."""
    merged = dict(base)
    for name, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = merged_options(merged[name], value)
        else:
            merged[name] = value
    return merged


class SegmentConfig(Section):
    max_seconds: float = Field(gt=0.0, description="The longest span a recording is cut into; recordings no longer are kept whole.")
    min_seconds: float = Field(
        default=1.0, ge=0.0, description="The shortest span the energy method cuts (at most half of max_seconds)."
    )
    method: Literal["energy", "fixed"] = Field(
        default="energy",
        description="energy: cut at the quietest point (10 ms energy smoothed over 100 ms) between half of max_seconds "
        "and max_seconds after the last cut, as libri-light's cut_by_vad cuts at silences; fixed: the fewest equal "
        "spans no longer than max_seconds.",
    )

    @model_validator(mode="after")
    def _room_between(self) -> SegmentConfig:
        if self.min_seconds * 2 > self.max_seconds:
            raise ValueError(f"min_seconds ({self.min_seconds}) must be at most half of max_seconds ({self.max_seconds})")
        return self


class CorpusConfig(Section):
    source: str = Field(
        description="A folder (searched recursively for .wav/.flac/.mp3/.ogg/.opus), a fairseq .tsv manifest "
        "(first line: root folder; then relpath<TAB>num_samples), a NeMo-style .jsonl manifest "
        "(audio_filepath, optional duration, speaker), a Lhotse RecordingSet or CutSet (.jsonl[.gz]), a "
        "Hugging Face dataset (saved to disk, or its .parquet shards: a file or a folder), or WebDataset "
        ".tar shards (a shard or a folder/prefix of them). Local path or s3:// URL."
    )
    format: Annotated[Literal["auto", "files", "fairseq", "nemo", "lhotse", "huggingface", "webdataset"], AddedLater()] = Field(
        default="auto", description="The source's format; auto: from its name and, for a folder or .jsonl, a look inside."
    )
    ids: Annotated[Literal["auto", "stem", "path"], AddedLater()] = Field(
        default="auto",
        description="Utterance ids of files: stem (the file name without extension; clashing names stop intake), path "
        "(the path below the source root without extension: speaker/chapter/0001), or auto: stem unless two files "
        "share one, then path. The intake report says which was used. Sharded and Lhotse sources give their own ids.",
    )
    segment: Annotated[SegmentConfig | None, AddedLater()] = Field(
        default=None,
        description="Cut recordings longer than segment.max_seconds into spans (utterances `<id>-00000`, ...); null "
        "keeps every recording whole.",
    )
    allowed_roots: Annotated[list[str], AddedLater()] = Field(
        default_factory=list,
        description="Folders and URL prefixes (s3://bucket/prefix, https://host/path) a manifest's entries may lie "
        "under besides the source's own root (a folder source; a NeMo .jsonl's folder; a fairseq .tsv's root line, "
        "where it is in the same place as the .tsv). Any other entry (an absolute path elsewhere, '..' out of the "
        "root, another bucket, an http:// URL) is rejected at intake, in the report, and never fetched.",
    )
    alignments: Annotated[str | None, OutputNeutral("read by labels and profile, not intake")] = Field(
        default=None,
        description="Optional folder of <utt_id>.tsv phone alignments (header: start_sec end_sec phone).",
    )
    min_seconds: float = Field(
        default=0.1, ge=0.0, description="Shorter files are rejected at intake (reported, not fatal)."
    )
    max_seconds: float | None = Field(
        default=None, gt=0.0, description="Longer files are rejected at intake; null keeps all."
    )
    valid: Annotated[float | str | None, AddedLater()] = Field(
        default=None,
        description="The validation split, held out of k-means fitting and training (its utterances still "
        "get labels, from the training centroids): a fraction in (0, 0.5] of the utterances, chosen by a "
        "seeded hash of each utterance id (the same ids whatever the corpus order or size), or a listing "
        "of validation ids: a text file with one id per line, or a fairseq .tsv / NeMo .jsonl whose file "
        "names give the ids. Null: no validation split.",
    )
    valid_seed: Annotated[int, AddedLater(along_with="valid")] = Field(default=0, ge=0, description="Seed of the hash that picks a fractional validation split.")

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


class DaskConfig(Section):
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


class LeaseConfig(Section):
    ttl_seconds: float = Field(
        default=DEFAULT_TTL_SECONDS,
        ge=1.0,
        le=86400.0,
        description="A run's lease (one writer per run) is renewed every ttl_seconds/4; a lease not renewed for "
        "ttl_seconds belonged to a writer that died and is taken over. Machines' clocks must agree to well within it.",
    )



class QualityGateConfig(Section):
    min_pnmi_gain: float = Field(
        ge=-1.0, le=1.0,
        description="Stop the run before training an iteration whose labels' PNMI is not at least this much "
        "above the previous iteration's (0: any regression stops it).",
    )



class PretrainConfig(Section):
    run: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        max_length=128,
        description="Run name: the folder under the store that holds every artifact of this run.",
    )
    store: str = Field(description="Artifact store root: a local folder or an s3://bucket/prefix URL.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for s3:// paths, without credentials: endpoint (client_kwargs: {endpoint_url: ...}), "
        "retries, timeouts. Credentials (key, secret, token, password, ...) come from the environment "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), ~/.aws, or the Secret block named by storage_credentials_block; "
        "any written here in a config file are taken out when it is read, used, and never stored in Prefect, "
        "logs, records or reports.",
    )
    storage_credentials_block: str | None = Field(
        default=None,
        description="Name of a Prefect Secret block whose value is a JSON object of storage credentials "
        "(e.g. {\"key\": ..., \"secret\": ...}), read on the machine that runs the flow and added to storage_options. "
        "Empty: credentials from the environment or ~/.aws.",
    )
    corpus: CorpusConfig = Field(description="The audio to pretrain on, how intake filters it, and the validation split.")
    dask: DaskConfig = Field(default_factory=DaskConfig, description="The Dask cluster the stages run on: a LocalCluster, or an external scheduler.")
    quality_gate: QualityGateConfig | None = Field(
        default=None,
        description="Optional: refuse to train on labels that are not better than the previous iteration's "
        "(needs corpus.alignments). Without it a regression is a warning in the report and the CLI's table.",
    )
    lease: LeaseConfig = Field(default_factory=LeaseConfig, description="The run's lease: one writer per run.")
    iterations: list[IterationConfig] = Field(min_length=1, description="The HuBERT iterations, in order (counted from 1).")
    _credentials: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _credentials_kept_apart(cls, data: Any, handler: Any) -> PretrainConfig:
        """Credentials in storage_options are moved to a private attribute: used to open paths
        (`fsspec_options`), but never serialised, so never in Prefect's parameters, run.json or
        the JSON schema of the run form."""
        credentials: dict[str, Any] = {}
        if isinstance(data, dict) and isinstance(data.get("storage_options"), dict):
            public, credentials = split_credentials(data["storage_options"])
            data = {**data, "storage_options": public}
        config = handler(data)
        if credentials:
            config.__pydantic_private__["_credentials"] = merged_options(config._credentials, credentials)
        return config

    @property
    def fsspec_options(self) -> dict[str, Any]:
        """storage_options with the credentials kept apart: what opening a store or a corpus path takes."""
        return merged_options(self.storage_options, self._credentials)

    @property
    def has_credentials(self) -> bool:
        return bool(self._credentials)

    def with_credentials(self, credentials: dict[str, Any]) -> PretrainConfig:
        """A copy that opens paths with these credentials too (from a Secret block, or another copy)."""
        copy = self.model_copy()
        copy.__pydantic_private__ = {"_credentials": merged_options(self._credentials, credentials)}
        return copy

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
        missing = [number for number, iteration in enumerate(config.iterations[:-1], start=1) if iteration.train is None]
        if missing:
            raise ValidationError.from_exception_data(
                cls.__name__,
                [
                    {
                        "type": "value_error",
                        "loc": ("iterations", number - 1, "train"),  # pydantic counts from 0; field_path from 1
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
        for number, iteration in enumerate(self.iterations, start=1):
            if iteration.features.layer == "auto":
                raise ValueError(
                    f"iterations.{number}.features.layer 'auto' picks the layer with the highest PNMI, which needs corpus.alignments"
                )
        return self

    @model_validator(mode="after")
    def _auto_layers_need_a_profile(self) -> PretrainConfig:
        for number, iteration in enumerate(self.iterations[1:], start=2):
            previous = self.iterations[number - 2]
            if iteration.features.layer == "auto" and previous.train is not None and not previous.profile.enabled:
                raise ValueError(
                    f"iterations.{number}.features.layer 'auto' needs iterations.{number - 1}.profile.enabled"
                )
        return self

    @model_validator(mode="after")
    def _validation_settings_need_a_split(self) -> PretrainConfig:
        if self.corpus.has_valid_split:
            return self
        for number, iteration in enumerate(self.iterations, start=1):
            if iteration.train is None:
                continue
            if iteration.train.logging.valid_every is not None:
                raise ValueError(f"iterations.{number}.train.logging.valid_every: there is no validation split to validate on (set corpus.valid)")
            if iteration.train.weights_for_next == "best":
                raise ValueError(
                    f"iterations.{number}.train.weights_for_next: 'best' is chosen by validation loss, and there "
                    "is no validation split (set corpus.valid, or choose 'final')"
                )
        return self

    @model_validator(mode="after")
    def _warm_start_needs_the_same_model_before(self) -> PretrainConfig:
        for number, iteration in enumerate(self.iterations, start=1):
            if iteration.train is None or iteration.train.init != "warm":
                continue
            if number == 1:
                raise ValueError("iterations.1.train.init: 'warm' starts from the previous iteration's weights, and iteration 1 has none")
            before = self.iterations[number - 2].train
            previous = None if before is None else before.model
            if previous != iteration.train.model:
                raise ValueError(
                    f"iterations.{number}.train.init: 'warm' needs iteration {number - 1} to train the same model "
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
            if iteration.train is not None and iteration.train.launch.nnodes > 1 and not self.dask.is_external:
                raise ValueError(
                    f"iterations.{number}.train.launch.nnodes is {iteration.train.launch.nnodes}, which needs an external "
                    "Dask cluster (dask.address or dask.scheduler_file) with that many `train_node` workers; a LocalCluster is one machine"
                )
        return self

    @model_validator(mode="after")
    def _layers_exist_in_the_previous_model(self) -> PretrainConfig:
        """A later iteration's layer must exist in the preset the iteration before trains: known now, not after hours."""
        problems = []
        for number, (previous, iteration) in enumerate(zip(self.iterations, self.iterations[1:]), start=2):
            if previous.train is None:
                continue  # refused with its own field path: only the last iteration may leave train out
            layer, preset = iteration.features.layer, previous.train.model
            layers = HUBERT_CONFIGS[preset].encoder_num_layers
            if iteration.features.kind == "hubert" and isinstance(layer, int) and layer > layers:
                problems.append(
                    f"iterations.{number}.features.layer: {layer} exceeds the {layers} layers of iteration {number - 1}'s '{preset}' model"
                )
        if problems:
            raise ValueError("\n  ".join(problems))
        return self


class ConfigError(ValueError):
    """An invalid configuration; the message lists every problem with its field path."""

    retryable = False  # a retry reads the same config


def field_path(loc: tuple[str | int, ...]) -> str:
    """`iterations.1.kmeans.k` from pydantic's location: iterations are counted from 1, as everywhere else."""
    parts = list(loc)
    for position, part in enumerate(parts[:-1]):
        if part == "iterations" and isinstance(parts[position + 1], int):
            parts[position + 1] += 1
    return ".".join(str(part) for part in parts)


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: `field.path: reason`, so users see all mistakes at once."""
    lines = [f"invalid configuration in {source}:"]
    for problem in error.errors():
        path = field_path(problem["loc"])
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
        if isinstance(corpus.get("allowed_roots"), list):
            resolved["corpus"]["allowed_roots"] = [resolve(root) for root in corpus["allowed_roots"]]
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
