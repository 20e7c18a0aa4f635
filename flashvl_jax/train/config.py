"""Typed training configuration, read from `configs/train/*.yaml` plus `key=value` overrides.

`load_train_config("stage1_adapter", ["optimizer.peak_lr=5e-4"])` validates everything once with
`flashvl_jax.config.from_dict`: an unknown key, a wrong type or a bad choice raises `ConfigError` naming the
dotted key. The model section names a preset (or YAML path) plus overrides of it, so one stage file serves
every Flash-VL variant.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Literal, Sequence

from flashvl_jax.config import (ConfigError, FlashVLConfig, apply_overrides, bounded, from_dict, load_config,
                                read_yaml)
from flashvl_jax.data.fields import Fields
from flashvl_jax.data.synthetic import SyntheticConfig
from flashvl_jax.models.layers import REMAT_CHOICES
from flashvl_jax.train.rewards import reward_fn


def check_regexes(patterns: Sequence[str], key: str) -> None:
  for pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({e})") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What to train: a preset, changed by `overrides`, randomly initialised or loaded from `init`."""

  preset: str = "demo-iss"  # a name in configs/models/ or a YAML path
  overrides: tuple[str, ...] = ()  # `key=value` applied to the preset, e.g. "llm.num_hidden_layers=4"
  init: str | None = None  # a model checkpoint (flashvl_jax.checkpoint) to start from, its config replacing the
  # preset's (overrides still apply); None: random initialisation
  compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # trainable parameters are always kept in float32
  frozen_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # parameters no `optimizer.trainable` regex matches
  remat: str = "none"  # per-layer rematerialisation of ViT and LLM layers: `layers.REMAT_CHOICES`
  seed: int = 0

  def __post_init__(self):
    if self.remat not in REMAT_CHOICES:
      raise ConfigError(f"model.remat must be one of {', '.join(REMAT_CHOICES)}, got {self.remat!r}")

  def flashvl_config(self, base: FlashVLConfig | None = None) -> FlashVLConfig:
    """The model config (the preset's, or `base`, e.g. a checkpoint's) with the overrides, float32 master
    weights and compute in `compute_dtype`."""
    return load_config(base or self.preset, [*self.overrides, "param_dtype=float32", f"dtype={self.compute_dtype}"])


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW on the parameters whose dotted path (e.g. `adp.linear_1.kernel`) matches a `trainable` regex.

  Everything else is frozen: no gradient, no optimizer state, bit-identical after training.
  The learning rate warms up linearly from 0 to `peak_lr`, then follows `schedule` down to `end_lr`.
  """

  trainable: tuple[str, ...] = (".*",)
  peak_lr: float = bounded(1e-5, gt=0)
  end_lr: float = bounded(0.0, ge=0)
  warmup_steps: int = bounded(0, ge=0)
  schedule: Literal["cosine", "linear", "constant"] = "cosine"
  b1: float = bounded(0.9, ge=0, lt=1)
  b2: float = bounded(0.999, ge=0, lt=1)
  eps: float = bounded(1e-8, gt=0)
  weight_decay: float = bounded(0.0, ge=0)  # applied to matrices only (not to norms, biases)
  grad_clip_norm: float | None = bounded(1.0, gt=0)

  def __post_init__(self):
    if not self.trainable:
      raise ConfigError("optimizer.trainable must list at least one regex (use '.*' to train everything)")
    check_regexes(self.trainable, "optimizer.trainable")
    if self.end_lr > self.peak_lr:
      raise ConfigError(f"optimizer.end_lr {self.end_lr} is above optimizer.peak_lr {self.peak_lr}; the schedule "
                        "decays from peak_lr to end_lr")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training examples: the synthetic visual-question task, or stored conversation / preference records."""

  source: Literal["synthetic", "json", "arrayrecord", "tfds", "parquet"] = "synthetic"
  # json: a .json / .jsonl file; arrayrecord, parquet: a file, a directory of them or a glob; tfds: the dataset
  # name (e.g. 'my_vqa' or 'my_vqa:1.0.0')
  path: str | None = None
  eval_path: str | None = None  # held-out records, like `path` (none: no eval); tfds: use eval_split
  split: str = "train"  # tfds: the split to train on
  eval_split: str | None = None  # tfds: the held-out split
  tfds_data_dir: str | None = None  # tfds: where the prepared dataset is (default: TFDS's, ~/tensorflow_datasets)
  image_root: str | None = None  # folder that relative image paths start from (json default: the file's)
  fields: Fields = Fields()  # the records' field names, when they are not the default ones
  synthetic: SyntheticConfig = SyntheticConfig()
  train_size: int = bounded(100_000, ge=1)  # synthetic: training samples
  eval_size: int = bounded(256, ge=0)  # synthetic: held-out samples
  tokenizer: str = "qwen2.5"  # `load_tokenizer` name or a Hugging Face directory
  max_length: int = bounded(2048, ge=1)  # tokens per row, image tokens included
  shuffle: bool = True
  seed: int = 0
  packing: bool = False  # several examples per row
  num_threads: int = bounded(2, ge=0)  # grain threads encoding examples, per process
  num_workers: int = bounded(0, ge=0)  # grain worker processes (threads are faster on few cores)
  prefetch: int = bounded(2, ge=0)  # batches prepared ahead
  bad_sample_policy: Literal["skip", "fail"] = "skip"
  # policy 'skip' stops the run when this many samples in a row are bad, or when more than `max_skip_fraction`
  # of the samples read so far (once 100 have been read) are: the data, not a few samples, is broken
  max_consecutive_skips: int = bounded(1000, ge=1)
  max_skip_fraction: float = bounded(0.5, gt=0, le=1)

  def __post_init__(self):
    if self.source != "synthetic" and not self.path:
      what = "the TFDS dataset name" if self.source == "tfds" else "the data file(s)"
      raise ConfigError(f"data.path ({what}) is required when data.source is {self.source!r}")
    if self.source == "tfds" and self.eval_path:
      raise ConfigError("data.eval_path is not used with data.source tfds: name the held-out split in "
                        "data.eval_split")
    if self.source != "tfds" and (self.eval_split or self.tfds_data_dir):
      raise ConfigError(f"data.eval_split and data.tfds_data_dir are for data.source tfds, not {self.source!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes; one axis may be -1 (all remaining devices)."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def __post_init__(self):
    sizes = dataclasses.asdict(self)
    if any(size < 1 and size != -1 for size in sizes.values()) or list(sizes.values()).count(-1) > 1:
      raise ConfigError(f"mesh sizes {sizes}: each must be >= 1, except at most one -1 (all remaining devices)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = bounded(1000, ge=1)  # also at the end of the run
  keep: int = bounded(3, ge=1)  # most recent checkpoints kept
  async_save: bool = True
  restart: bool = False  # output_dir already holds checkpoints: delete them and start over instead of refusing
  # (without --resume); the demo does this so that it can be run again


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every_steps: int = bounded(0, ge=0)  # 0: only at the end
  batch_size: int = bounded(0, ge=0)  # 0: the training global batch
  accuracy: bool = False  # at the end, greedy-generation exact match on the eval set (single-process runs)
  max_new_tokens: int = bounded(32, ge=1)  # for generated answers


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
  log_every_steps: int = bounded(10, ge=1)  # TensorBoard / JSONL
  peak_flops_per_device: float | None = bounded(None, gt=0)  # for MFU; None: looked up by device kind


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-host launch. With `coordinator_address` set (or `auto`), `jax.distributed.initialize` is called.

  `auto` lets JAX detect the cluster (TPU pods, SLURM, ...). Timeouts bound how long a process waits for the
  others to start and how soon a dead process is noticed.
  """

  coordinator_address: str | None = None  # "host:port" of process 0
  num_processes: int | None = bounded(None, ge=1)
  process_id: int | None = bounded(None, ge=0)
  auto: bool = False
  initialization_timeout_s: int = bounded(300, ge=1)
  heartbeat_timeout_s: int = bounded(60, ge=1)

  def __post_init__(self):
    if self.num_processes is not None and self.process_id is not None and self.process_id >= self.num_processes:
      raise ConfigError(f"distributed.process_id {self.process_id} must be below distributed.num_processes "
                        f"{self.num_processes}")


LLM_TARGETS = r"llm\.model\.layers\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
ADAPTER_TARGETS = r"adp\.(linear_1|linear_2|proj)"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which linears get adapters and how big they are.

  targets: regexes over dotted module paths (`llm.model.layers.self_attn.q_proj`), each matched in full. Layers
    are stacked, so a path names that linear in every layer.
  alpha / rank scales the update; dropout applies to the adapter's input during training steps.
  """

  rank: int = 8
  alpha: float = bounded(16.0, gt=0)
  dropout: float = 0.0
  targets: tuple[str, ...] = (LLM_TARGETS, ADAPTER_TARGETS)
  seed: int = 0  # initialises the A matrices

  def __post_init__(self):
    if self.rank < 1:
      raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
    if not 0 <= self.dropout < 1:
      raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
    if not self.targets:
      raise ConfigError("lora.targets must list at least one module-path regex")
    check_regexes(self.targets, "lora.targets")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """Sigmoid DPO; the paper grid-searched beta and chose 0.1."""

  beta: float = 0.1
  label_smoothing: float = 0.0  # > 0: conservative DPO (the preference labels are noisy with this probability)

  def __post_init__(self):
    if not self.beta > 0:
      raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
    if not 0 <= self.label_smoothing < 0.5:
      raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Rollouts, rewards and the clipped objective. The paper (Static-GRPO): group 24, KL coefficient 0.001."""

  group_size: int = 24  # completions sampled per prompt (G); `global_batch_size` counts prompts
  max_new_tokens: int = 256
  temperature: float = 1.0
  top_k: int = bounded(0, ge=0)  # 0: off
  top_p: float = bounded(1.0, gt=0, le=1)  # 1.0: off
  epsilon: float = 0.2  # clip range of the policy ratio
  kl_coef: float = 0.001  # weight of the k3 KL estimate to the reference (adapters off)
  num_iterations: int = 1  # optimizer steps per batch of rollouts (mu)
  rewards: tuple[str, ...] = ("exact_match",)  # names in `rewards.REWARDS` or 'module:function' paths, summed
  seed: int = 0  # sampling seed (combined with the step)
  # decode slots of the rollout engine; 0: one per rollout (prompts x group_size). Fewer slots decode narrower
  # batches, refilled as completions finish
  rollout_slots: int = bounded(0, ge=0)

  def __post_init__(self):
    if self.group_size < 2:
      raise ConfigError(f"grpo.group_size must be >= 2 (advantages compare completions of a prompt), got "
                        f"{self.group_size}")
    if self.max_new_tokens < 1:
      raise ConfigError(f"grpo.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.temperature > 0:
      raise ConfigError(f"grpo.temperature must be > 0, got {self.temperature}")
    if not 0 < self.epsilon < 1:
      raise ConfigError(f"grpo.epsilon must be in (0, 1), got {self.epsilon}")
    if self.kl_coef < 0:
      raise ConfigError(f"grpo.kl_coef must be >= 0, got {self.kl_coef}")
    if self.num_iterations < 1:
      raise ConfigError(f"grpo.num_iterations must be >= 1, got {self.num_iterations}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training run (one stage of the Flash-VL pipeline)."""

  name: str = "run"
  objective: Literal["sft", "dpo", "grpo"] = "sft"  # dpo and grpo train LoRA adapters (`lora`) only
  output_dir: str = "runs/demo"  # checkpoints/, events (TensorBoard), metrics.jsonl
  model: ModelConfig = ModelConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  eval: EvalConfig = EvalConfig()
  metrics: MetricsConfig = MetricsConfig()
  distributed: DistributedConfig = DistributedConfig()
  lora: LoraConfig | None = None  # adapters added to the model before training; merged into it at the end
  dpo: DPOConfig = DPOConfig()
  grpo: GRPOConfig = GRPOConfig()
  global_batch_size: int = bounded(8, ge=1)
  grad_accum_steps: int = bounded(1, ge=1)  # the global batch is processed in this many micro-batches
  steps: int | None = bounded(None, ge=1)  # None: `epochs` passes over the training data
  epochs: int = bounded(1, ge=1)
  max_target_tokens: int | None = bounded(None, ge=1)  # score only each row's first N answer tokens (None: all)
  demo_questions: int = bounded(0, ge=0)  # after training, answer this many held-out questions on the console
  compilation_cache_dir: str | None = None  # persistent XLA cache (else $JAX_COMPILATION_CACHE_DIR; docs/benchmarks.md)

  def __post_init__(self):
    if self.global_batch_size % self.grad_accum_steps:
      raise ConfigError(f"global_batch_size {self.global_batch_size} is not divisible by grad_accum_steps "
                        f"{self.grad_accum_steps}")
    if self.objective != "sft" and self.lora is None:
      raise ConfigError(f"objective {self.objective!r} needs a lora section: its reference policy is the model with "
                        "the adapters switched off (see configs/train/stage5_dpo.yaml)")
    if self.objective != "sft" and self.data.packing:
      raise ConfigError(f"data.packing is for SFT conversations; set it to false for objective {self.objective!r}")
    if self.objective == "grpo":
      reward_fn(self.grpo.rewards)  # an unknown name or a path that does not import fails here, not after setup


def load_train_config(name_or_path: str | pathlib.Path = "demo", overrides: Sequence[str] = ()) -> TrainConfig:
  """A `TrainConfig` from a name in configs/train/ (e.g. 'stage1_adapter') or a YAML path, plus overrides."""
  data = apply_overrides(read_yaml(name_or_path, section="train"), overrides)
  cfg = from_dict(TrainConfig, data)
  cfg.model.flashvl_config()  # validate the model preset and its overrides now, not after data loading
  return cfg
