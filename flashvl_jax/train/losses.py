"""Supervised fine-tuning loss: next-token cross-entropy on assistant tokens, summed with its token count.

`loss_mask[b, t]` marks token t as a target (answer tokens and their `<|im_end|>`). The logits at position
t predict token t + 1, so targets and weights are the ids and the mask shifted left by one. Returning the
sum and the count (not the mean) lets gradient accumulation weight every micro-batch by its tokens.

With `max_targets`, only the first `max_targets` target positions of each row are scored, so the LM head
and the softmax over the vocabulary run on those positions alone (short answers after long prompts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flashvl_jax.config import ConfigError


def next_token_targets(input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(targets [B, T], weights [B, T] fp32): position t is scored on token t + 1; the last position never."""
  targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
  weights = jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
  return jnp.maximum(targets, 0), weights  # image placeholders (< 0) are never targets


def select_targets(input_ids: jax.Array, loss_mask: jax.Array,
                   max_targets: int | None = None) -> tuple[jax.Array | None, jax.Array, jax.Array]:
  """(positions [B, K] or None for all T, targets [B, K], weights [B, K]) of the scored positions.

  With `max_targets` = K the positions are each row's first K target positions in order (padded with
  weight-0 positions); rows must not hold more (`check_max_targets`).
  """
  targets, weights = next_token_targets(input_ids, loss_mask)
  if max_targets is None:
    return None, targets, weights
  positions = jnp.argsort(weights <= 0, axis=-1, stable=True)[:, :max_targets].astype(jnp.int32)
  take = lambda x: jnp.take_along_axis(x, positions, axis=1)
  return positions, take(targets), take(weights)


def check_max_targets(loss_mask: np.ndarray, max_targets: int | None) -> None:
  """Host-side check that no row has more next-token targets than `max_targets`."""
  if max_targets is None:
    return
  most = int(np.asarray(loss_mask)[:, 1:].sum(-1).max(initial=0))
  if most > max_targets:
    raise ConfigError(f"a batch row has {most} answer tokens but max_target_tokens is {max_targets}; raise "
                      "max_target_tokens (or set it to null to score every position)")


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(summed fp32 cross-entropy of `targets` under `logits` [B, K, V], weighted; sum of weights)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


def answer_matches(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(rows whose every target token is the argmax, rows with a target).

  With teacher forcing this equals greedy-decoding exact match on the target tokens: greedy decoding
  reproduces the answer exactly when each answer token is the argmax given the answer's prefix.
  """
  wrong = (jnp.argmax(logits, axis=-1) != targets) & (weights > 0)
  has_target = jnp.any(weights > 0, axis=-1)
  return jnp.sum(has_target & ~jnp.any(wrong, axis=-1)), jnp.sum(has_target)
