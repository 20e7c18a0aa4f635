"""A GRPO reward for tests: random completions of a random model earn different rewards under it (the verifiable
rewards of `train.rewards` are all 0 for them), so group advantages and losses are not zero."""


def character_variety(completion: str, answer: str) -> float:  # pylint: disable=unused-argument
  """Distinct characters per character of the completion (0 for an empty one)."""
  return len(set(completion)) / len(completion) if completion else 0.0
