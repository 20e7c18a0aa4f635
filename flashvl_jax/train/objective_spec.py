"""What a training objective (`TrainConfig.objective`) brings to the trainer and to `--compile-only`.

`ObjectiveSpec` is SFT: conversation records, the token-mean cross-entropy (`steps.sft_objective`), the shared
jitted step on this process's batch, held-out loss and generation accuracy, the accuracy line at the end.
`dpo.DPOSpec` and `grpo.GRPOSpec` override what differs; `objectives.OBJECTIVES` maps config names to them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from flashvl_jax.config import FlashVLConfig
from flashvl_jax.data.pipeline import TEXT_KEYS
from flashvl_jax.preprocess import tiling
from flashvl_jax.preprocess.tokenizer import Tokenizer
from flashvl_jax.train.config import TrainConfig
from flashvl_jax.train.losses import check_max_targets
from flashvl_jax.train.state import TrainState
from flashvl_jax.train.steps import Objective, host_metrics, sft_objective, to_global

Shapes = dict[str, tuple[tuple[int, ...], Any]]  # {key: (shape, dtype)}
RunStep = Callable[[TrainState, dict[str, np.ndarray]], tuple[TrainState, dict[str, float]]]


def batch_shapes(rows: int, length: int, model_cfg: FlashVLConfig, text_keys: tuple[str, ...] = TEXT_KEYS) -> Shapes:
  """{key: (shape, dtype)} of `rows` rows of `length` tokens with images, as the data pipeline makes them."""
  tiles, image_tokens = tiling.max_tiles(model_cfg), tiling.max_image_tokens(model_cfg)
  size, group = model_cfg.vision.image_size, model_cfg.adapter.shuffle_factor**2
  return {**{k: ((rows, length), jnp.int32) for k in text_keys},
          "pixel_values": ((rows, tiles, size, size, 3), jnp.uint8), "tile_mask": ((rows, tiles), jnp.bool_),
          "image_patch_index": ((rows, image_tokens, group), jnp.int32), "num_image_tokens": ((rows,), jnp.int32)}


@dataclasses.dataclass(frozen=True)
class StepParts:
  """What the trainer has built when an objective makes its step."""

  cfg: TrainConfig
  graphdef: nnx.GraphDef
  state: TrainState  # the initial state (its shapes and shardings)
  shardings: TrainState
  mesh: Mesh
  train_step: Callable  # the jitted `(state, global batch) -> (state, metrics)` of the objective's loss
  tokenizer: Tokenizer


class ObjectiveSpec:
  """SFT; the base of every objective."""

  name = "sft"
  records = "conversation"  # what the data pipeline makes of a record: 'conversation' rows or 'preference' pairs
  needs_lora = False  # trains LoRA adapters only (its reference policy is the model with them off)
  evaluates_by_loss = True  # the jitted eval step on held-out batches
  generates_by_rollouts = False  # `--compile-only` lowers the rollout engine instead of the sampler

  def loss(self, cfg: TrainConfig) -> Objective:
    return sft_objective(cfg.max_target_tokens)

  def batch_shapes(self, cfg: TrainConfig, model_cfg: FlashVLConfig) -> Shapes:
    """One global batch as the step receives it."""
    b, length = cfg.global_batch_size, cfg.data.max_length
    shapes = batch_shapes(b, length, model_cfg)
    if cfg.data.packing:
      shapes.update(segment_ids=((b, length), jnp.int32), position_ids=((b, length), jnp.int32))
    return shapes

  def model_rows(self, cfg: TrainConfig) -> tuple[int, int]:
    """(rows, tokens per row) the model runs on per global batch, for the FLOP count."""
    return cfg.global_batch_size, cfg.data.max_length

  def lm_head_tokens_per_row(self, cfg: TrainConfig) -> int | None:
    """Positions per row the LM head scores (None: every position)."""
    return cfg.max_target_tokens

  def check_batch(self, cfg: TrainConfig, local: dict[str, np.ndarray]) -> None:
    """Refuses a batch this objective cannot train on (before the step)."""
    for key in (k for k in local if k.endswith("loss_mask")):
      check_max_targets(local[key], cfg.max_target_tokens)

  def make_step(self, parts: StepParts) -> RunStep:
    """`(state, this process's batch) -> (state, host metrics)`."""
    return lambda state, local: host_metrics(*parts.train_step(state, to_global(local, parts.mesh)))

  def report(self, final: dict[str, float]) -> str | None:
    """The line printed after the final evaluation."""
    accuracy = final.get("accuracy", final.get("answer_accuracy"))
    return None if accuracy is None else f"eval accuracy: {accuracy:.2f}"

