"""The settings of an iteration's stages: one pydantic section per stage, validated before any work.

Each setting says in its type whether it changes its stage's outputs (tasks/run/keys.py): the
stage keys are derived from that, so changing how a model is launched, logged, checkpointed or
measured never trains it again. Every section forbids unknown keys: a typo is an error, not a
silently ignored setting.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.run.keys import AddedLater, OutputNeutral

log = logging.getLogger(__name__)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeaturesConfig(Section):
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
    keep: Annotated[Literal["all", "sample"], AddedLater()] = Field(
        default="all",
        description="all: the features store holds every utterance's frames. sample: it holds only the "
        "training utterances k-means fits on (about kmeans.sample_fraction of the training frames, capped "
        "by kmeans.max_frames, chosen whole by a seeded hash of their ids, seed kmeans.seed), and the label "
        "stage computes every utterance's features again on the fly and writes only labels: the labels "
        "equal those of 'all'. It needs a sample smaller than the corpus (sample_fraction below 1 or a "
        "max_frames): a sample of everything would store every training frame and compute it twice.",
    )
    dtype: Annotated[Literal["float32", "float16"], AddedLater()] = Field(
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


class KMeansConfig(Section):
    k: int = Field(ge=2, le=32767, description="Number of clusters (label vocabulary size).")
    sample_fraction: float = Field(default=1.0, gt=0.0, le=1.0, description="Share of frames fitted on.")
    max_frames: int | None = Field(default=None, ge=1, description="Cap on frames fitted on.")
    max_iter: int = Field(default=100, ge=1, description="Lloyd iterations at most.")
    seed: int = Field(default=0, ge=0, description="Seed of the sample and of k-means++.")
    init: Literal["k-means++", "random"] = Field(default="k-means++", description="How the centroids start.")

    @model_validator(mode="after")
    def _enough_frames_for_k(self) -> KMeansConfig:
        if self.max_frames is not None and self.max_frames < self.k:
            raise ValueError(f"max_frames {self.max_frames} is fewer than k={self.k}: k-means needs at least k frames")
        return self


class LayerProfileConfig(Section):
    """After training, every transformer layer is clustered and measured on a fixed sample (the profile stage)."""

    enabled: Annotated[bool, OutputNeutral("whether the stage runs at all")] = Field(
        default=True, description="Measure every layer after training."
    )
    utterances: int = Field(default=100, ge=1, description="Utterances in the sample (chosen by a seeded hash of their ids).")
    k: int = Field(default=100, ge=2, le=32767, description="Clusters per layer (the paper compares layers at k=100).")
    seed: int = Field(default=0, ge=0, description="Seed of the sample and of each layer's k-means.")


class ProbeConfig(Section):
    """After training, what a small labelled set gets out of the frozen model (the probe stage):
    phone recognition from a softmax-weighted sum of its layers with a linear CTC head (PER), and
    each layer's frame phone accuracy, with MFCC through the same probes as the baseline. It needs
    phone alignments and a validation split: the probe is scored on validation utterances, which
    neither pretraining nor the probe trained on."""

    enabled: Annotated[bool, OutputNeutral("whether the stage runs at all")] = Field(
        default=True, description="Probe the model after training (where the corpus has alignments and a validation split)."
    )
    train_minutes: float = Field(
        default=10.0, gt=0, description="Labelled audio the probe trains on: training utterances chosen by a seeded "
        "hash of their ids (the paper's smallest fine-tuning set is 10 minutes)."
    )
    test_minutes: float | None = Field(
        default=None, gt=0, description="Validation audio the probe is scored on (chosen the same way); null: all of it."
    )
    steps: int = Field(
        default=2000, ge=1, description="Adam steps of the CTC head, 8 utterances a step (a dev tenth of the probe set picks the best step)."
    )
    seed: int = Field(default=0, ge=0, description="Seed of the choice of utterances and of the probes.")


class LaunchConfig(Section):
    """Where training runs: processes and machines. World size (processes x machines) changes how
    much audio a step sees, so it is in train's key; how it is laid out is not."""

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

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


class TrainIOConfig(Section):
    """How training reads and saves: none of it changes a trained weight."""

    prefetch_batches: int = Field(
        default=2,
        ge=0,
        description="Batches read and cropped ahead of the step on background threads, so steps do not wait "
        "for storage (0: each batch is read in the step).",
    )
    checkpoint_every: int = Field(
        default=1000, ge=1, description="Steps between checkpoints (a resumed run continues from the newest)."
    )
    keep_previous: int = Field(
        default=1,
        ge=0,
        description="Trained models (with their checkpoints) kept in the store when a changed setting trains "
        "the iteration again: the newest this many, each under its key, so going back to the earlier "
        "settings takes it back instead of training again. 0 deletes the old model.",
    )


class TrainLoggingConfig(Section):
    """What training reports as it goes: none of it changes a trained weight."""

    log_every: int = Field(default=100, ge=1, description="Steps between log lines.")
    valid_every: int | None = Field(
        default=None,
        ge=1,
        description="Steps between validation passes (loss and masked accuracy on the validation split, "
        "with fixed crops and masks), and at the last step; null: every io.checkpoint_every steps. Needs "
        "corpus.valid. It decides which step best.pt is from.",
    )


MOVED_TRAIN_SETTINGS = {
    "nproc": "launch", "nnodes": "launch", "rdzv_port": "launch",
    "prefetch_batches": "io", "checkpoint_every": "io",
    "log_every": "logging", "valid_every": "logging",
}
"""Settings that were once flat in `train` and now sit in a section of it."""


class TrainConfig(Section):
    """The training recipe (in train's key), and how it is launched, read and saved, and logged (not)."""

    model: Literal["tiny", "base", "large", "xlarge", "tiny-fbank", "base-fbank"] = Field(
        default="base",
        description="Architecture preset (model/presets.py); the -fbank ones feed the transformer log-mel filterbanks in "
        "place of the learned conv stack and do not export to Hugging Face.",
    )
    steps: int = Field(default=400_000, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(default=5e-4, gt=0, le=1, description="Peak learning rate (AdamW).")
    warmup_steps: int | None = Field(default=None, ge=1, description="Linear warm-up; null: 8% of steps.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW's decoupled weight decay.")
    clip_norm: float = Field(default=10.0, gt=0, description="Gradient norm clipping.")
    accumulation: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    max_batch_seconds: float = Field(default=87.5, gt=0, description="Audio per batch per process (fairseq: 1.4 M samples).")
    max_sample_seconds: float = Field(default=15.625, gt=0, description="Random crop length (fairseq: 250,000 samples).")
    unmasked_weight: float = Field(default=0.0, ge=0, description="Loss weight of unmasked frames.")
    init: Annotated[Literal["cold", "warm"], AddedLater()] = Field(
        default="cold",
        description="cold: fresh weights, as the paper; warm: start from the previous iteration's weights "
        "(those it chose for the next iteration), except the label embeddings and final projection, which "
        "depend on the labels. Warm needs the previous iteration to train the same model.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the initial weights, crops and masks.")
    bf16: bool = Field(default=True, description="bf16 autocast on GPU (ignored on CPU).")
    weights_for_next: Annotated[Literal["best", "final"] | None, OutputNeutral("what the next iteration reads")] = Field(
        default=None,
        description="Which weights the next iteration takes features (and a warm start) from: best (lowest "
        "validation loss; needs corpus.valid) or final (the weights after the last step); null: best when "
        "there is a validation split, final otherwise.",
    )
    launch: Annotated[LaunchConfig, OutputNeutral("launch layout")] = Field(
        default_factory=LaunchConfig, description="Processes and machines."
    )
    io: Annotated[TrainIOConfig, OutputNeutral("reading ahead, checkpointing, keeping")] = Field(
        default_factory=TrainIOConfig, description="Reading ahead, checkpoints, and earlier models kept."
    )
    logging: Annotated[TrainLoggingConfig, OutputNeutral("logging and validation")] = Field(
        default_factory=TrainLoggingConfig, description="Log lines and validation passes."
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_settings(cls, data: Any) -> Any:
        """A flat setting from before the sections existed is refused, naming where it lives now."""
        if isinstance(data, dict) and (moved := sorted(set(data) & set(MOVED_TRAIN_SETTINGS))):
            places = ", ".join(f"{name} -> {MOVED_TRAIN_SETTINGS[name]}.{name}" for name in moved)
            raise ValueError(f"these train settings moved into sections: {places}")
        return data

    @model_validator(mode="after")
    def _batch_holds_a_crop(self) -> TrainConfig:
        if self.max_batch_seconds < self.max_sample_seconds:
            raise ValueError(
                f"max_batch_seconds ({self.max_batch_seconds}) must be at least max_sample_seconds ({self.max_sample_seconds})"
            )
        return self


class IterationConfig(Section):
    features: FeaturesConfig = Field(description="What this iteration clusters: MFCC (iteration 1) or a layer of the previous model.")
    kmeans: KMeansConfig = Field(description="The k-means that turns those features into this iteration's labels.")
    train: TrainConfig | None = Field(
        default=None,
        description="Training of this iteration's model. Only the last iteration may leave it out: it then "
        "runs features, k-means and labels on the previous model, which ends a run with that model's units.",
    )
    profile: LayerProfileConfig = Field(
        default_factory=LayerProfileConfig,
        description="The layer profile of the model this iteration trains (its own stage, after train).",
    )
    probe: ProbeConfig = Field(
        default_factory=ProbeConfig,
        description="The downstream phone probe of the model this iteration trains (its own stage, after profile).",
    )

    @model_validator(mode="before")
    @classmethod
    def _profile_moved_out_of_train(cls, data: Any) -> Any:
        """`train.profile` (before the profile was a stage of its own) is read as `profile`."""
        if isinstance(data, dict) and isinstance(data.get("train"), dict) and "profile" in data["train"]:
            if "profile" in data:
                raise ValueError("give the layer profile's settings once, as profile (train.profile is its old place)")
            train = dict(data["train"])
            log.warning("train.profile is now an iteration's own section, profile: read it there")
            data = {**data, "train": train, "profile": train.pop("profile")}
        return data

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
