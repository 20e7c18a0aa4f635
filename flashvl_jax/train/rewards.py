"""Verifiable rewards for GRPO: functions `(completion text, reference answer) -> float`.

`REWARDS` maps the names a config uses (`grpo.rewards`) to functions; add an entry to plug in another check.
Several names are summed (`reward_fn`).
"""

from __future__ import annotations

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


def reward_fn(names: Sequence[str]) -> RewardFn:
  """The sum of the named rewards; an unknown name raises `ConfigError` listing the known ones."""
  unknown = [n for n in names if n not in REWARDS]
  if unknown or not names:
    raise ConfigError(f"grpo.rewards {list(names)} must name one or more of {sorted(REWARDS)}")
  fns = [REWARDS[n] for n in names]
  return lambda completion, answer: sum(fn(completion, answer) for fn in fns)
