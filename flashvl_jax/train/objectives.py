"""The training objectives by their config name (`TrainConfig.objective`); each spec owns its data view, batch
shapes, counted metrics, whether it needs LoRA, its step and its final report (`objective_spec`)."""

from __future__ import annotations

from flashvl_jax.train.dpo import DPOSpec
from flashvl_jax.train.grpo import GRPOSpec
from flashvl_jax.train.objective_spec import ObjectiveSpec

OBJECTIVES: dict[str, ObjectiveSpec] = {spec.name: spec for spec in (ObjectiveSpec(), DPOSpec(), GRPOSpec())}
