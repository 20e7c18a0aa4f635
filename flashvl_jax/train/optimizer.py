"""Learning-rate schedules, regex freezing and the AdamW optimizer over the trainable parameters only.

Freezing splits the model state before the optimizer sees it: `trainable_filter` selects the parameters
whose dotted path matches a regex, gradients are taken with respect to those alone and the optimizer is
built over them, so frozen parameters get no gradient, no optimizer state and are never written.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import optax
from flax import nnx

from flashvl_jax.config import ConfigError
from flashvl_jax.models.layers import LAYER_AXIS
from flashvl_jax.train.config import OptimizerConfig


def path_name(path: Sequence[Any]) -> str:
  """The dotted name of a state path, e.g. ('adp', 'linear_1', 'kernel') -> 'adp.linear_1.kernel'."""
  return ".".join(str(p) for p in path)


def trainable_filter(patterns: Sequence[str]) -> Callable[[tuple, Any], bool]:
  """An nnx filter: `nnx.Param`s whose dotted path matches any of `patterns` (`re.search`)."""
  regexes = [re.compile(p) for p in patterns]

  def is_trainable(path: tuple, value: Any) -> bool:
    return isinstance(value, nnx.Param) and any(r.search(path_name(path)) for r in regexes)

  return is_trainable


def check_patterns(model: nnx.Module, patterns: Sequence[str]) -> None:
  """Raises if a `trainable` regex matches no parameter (a typo would silently freeze everything it meant)."""
  names = [path_name(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  for pattern in patterns:
    if not any(re.search(pattern, n) for n in names):
      raise ConfigError(f"optimizer.trainable regex {pattern!r} matches no parameter; parameter paths look like "
                        f"{', '.join(names[:3])}, ...")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> peak_lr over `warmup_steps`, then cosine / linear / constant to end_lr at `total_steps`."""
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.peak_lr, decay_steps, alpha=cfg.end_lr / cfg.peak_lr if cfg.peak_lr else 0)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.peak_lr, cfg.end_lr, decay_steps)
  else:
    decay = optax.constant_schedule(cfg.peak_lr)
  if not cfg.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, cfg.peak_lr, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def is_matrix(param: nnx.Variable) -> bool:
  """Whether one layer's copy of `param` has >= 2 dims (a stacked norm scale [L, D] is still a vector)."""
  axes = param.get_metadata().get("out_sharding") or ()
  stacked = bool(axes) and axes[0] == LAYER_AXIS
  return param.ndim - stacked >= 2


def make_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW; weight decay on matrices only."""
  decay_mask = lambda params: jax.tree.map(is_matrix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.grad_clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
