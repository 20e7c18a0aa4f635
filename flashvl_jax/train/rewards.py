"""Verifiable rewards for GRPO: functions `(completion text, reference answer) -> float`.

`REWARDS` maps the names a config uses (`grpo.rewards`) to functions. A name `package.module:function` imports
a function of your own instead (it must be importable, e.g. on PYTHONPATH). Several names are summed
(`reward_fn`).
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

from flashvl_jax.config import ConfigError
from flashvl_jax.data.synthetic import counting_reward, normalize_answer

RewardFn = Callable[[str, str], float]


def exact_match(completion: str, answer: str) -> float:
  """1.0 when the completion equals the answer after `normalize_answer` (case, punctuation, number words)."""
  return float(normalize_answer(completion) == normalize_answer(answer))


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "numeric": counting_reward,  # the first number in the completion (digits or a word) equals the answer
}


def named_reward(name: str) -> RewardFn:
  """The reward `name` stands for: an entry of `REWARDS`, or `module:function`; else `ConfigError`."""
  if name in REWARDS:
    return REWARDS[name]
  module_name, _, function_name = name.partition(":")
  if not function_name:
    raise ConfigError(f"grpo.rewards: {name!r} is none of {sorted(REWARDS)} and not a 'module:function' path")
  try:
    fn = getattr(importlib.import_module(module_name), function_name)
  except ImportError as e:
    raise ConfigError(f"grpo.rewards: cannot import {module_name!r} for {name!r}: {e}") from e
  except AttributeError as e:
    raise ConfigError(f"grpo.rewards: module {module_name!r} has no {function_name!r}") from e
  if not callable(fn):
    raise ConfigError(f"grpo.rewards: {name!r} is not a function")
  return fn


def reward_fn(names: Sequence[str]) -> RewardFn:
  """The sum of the named rewards (`named_reward`); `ConfigError` for an empty list or an unknown name."""
  if not names:
    raise ConfigError(f"grpo.rewards must name one or more of {sorted(REWARDS)} (or 'module:function' paths)")
  fns = [named_reward(n) for n in names]
  return lambda completion, answer: sum(float(fn(completion, answer)) for fn in fns)
