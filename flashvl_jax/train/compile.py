"""Ahead-of-time compilation of the sharded train step for a TPU topology, on any host with `libtpu` installed.

`python -m flashvl_jax.train stage2_full --compile-only --topology v5e:2x4` builds the model and its train state
abstractly (`nnx.eval_shape`, shapes with shardings, no arrays), lowers the same jitted step that training
runs (its objective, with LoRA adapters when the config has them) and what generates (GRPO: the rollout
engine's admission and decode; else the sampler's prefill and decode for a batch of the run's prompts),
compiles them with XLA's TPU compiler for the topology's devices, and reports what one device needs
(`compiled.memory_analysis()`) and does (`compiled.cost_analysis()`). Nothing runs; no TPU is needed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding

from flashvl_jax import checkpoint, sampling
from flashvl_jax.config import ConfigError, load_config
from flashvl_jax.engine import Engine
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.models.layers import set_remat
from flashvl_jax.preprocess import tiling
from flashvl_jax.sharding import batch_sharding, make_mesh, replicated, state_shardings, without_axes
from flashvl_jax.train import flops
from flashvl_jax.train.config import TrainConfig
from flashvl_jax.train.optimizer import make_optimizer, make_schedule
from flashvl_jax.train.lora import add_lora
from flashvl_jax.train.grpo import ROLLOUT_REPLICATED
from flashvl_jax.train.state import TrainState, abstract_train_state
from flashvl_jax.train.steps import make_train_step
from flashvl_jax.train.objective_spec import batch_shapes
from flashvl_jax.train.objectives import OBJECTIVES
from flashvl_jax.train.trainer import trainable_components

GIB = 1024**3


def topology_devices(topology: str) -> list[Any]:
  """The devices of a TPU topology such as 'v5e:2x4' (libtpu must be installed; no TPU needed)."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise ConfigError("--compile-only needs libtpu: pip install 'flashvl-jax[tpu]'") from None
  try:
    return list(topologies.get_topology_desc(topology, "tpu").devices)
  except Exception as e:  # libtpu reports a bad name in many ways
    if "lockfile" in str(e):  # another process on this host has libtpu loaded
      raise ConfigError("libtpu is in use by another process on this host; wait for it to finish, or set "
                        "ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile beside it") from e
    raise ConfigError(f"cannot build TPU topology {topology!r} ({e}); write it as GENERATION:SHAPE, e.g. v5e:2x4, "
                     "v5e:4x4, v4:2x2x2, v5p:2x2x2, v6e:4x4") from e


def abstract(shapes: dict[str, tuple], sharding_of) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_of(len(shape))) for k, (shape, dtype) in shapes.items()}


def abstract_batch(cfg: TrainConfig, model_cfg, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one global batch of the run's objective (its spec's `batch_shapes`), split over ('data', 'fsdp')."""
  return abstract(OBJECTIVES[cfg.objective].batch_shapes(cfg, model_cfg), lambda ndim: batch_sharding(mesh, ndim))


def _timed(timings: dict[str, float] | None, name: str, fn):
  """`fn()`, adding its wall seconds to `timings[name]` when `timings` is given."""
  start = time.perf_counter()
  out = fn()
  if timings is not None:
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
  return out


def abstract_run(cfg: TrainConfig, mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, TrainState, Any, Any, Any]:
  """(graphdef, train state of shapes with shardings, its shardings, model config, optimizer, schedule) of the
  run's model (with its LoRA adapters and remat), from shapes alone."""
  base = checkpoint.read_info(cfg.model.init).config if cfg.model.init else None
  model_cfg = cfg.model.flashvl_config(base)
  model = nnx.eval_shape(lambda: FlashVLModel(model_cfg, rngs=nnx.Rngs(0)))
  if cfg.lora is not None:
    add_lora(model, cfg.lora)
  set_remat(model, cfg.model.remat)
  schedule = make_schedule(cfg.optimizer, cfg.steps or 1)  # the step count only changes schedule constants
  tx = make_optimizer(cfg.optimizer, schedule)
  graphdef, state, shardings = abstract_train_state(model, cfg.optimizer.trainable, tx, mesh,
                                                    frozen_dtype=cfg.model.frozen_dtype)
  return graphdef, state, shardings, model_cfg, tx, schedule


def compile_train_step(cfg: TrainConfig, mesh: Mesh,
                       timings: dict[str, float] | None = None) -> tuple[Any, Any, dict[str, bool]]:
  """(compiled train step, model config, trainable components) for `mesh`, from shapes alone; `timings` gets the
  seconds of 'train_step_lower' and 'train_step_compile'."""
  graphdef, state, shardings, model_cfg, tx, schedule = abstract_run(cfg, mesh)
  step = make_train_step(graphdef, tx, schedule, shardings, mesh, OBJECTIVES[cfg.objective].loss(cfg),
                         grad_accum_steps=cfg.grad_accum_steps)
  with jax.set_mesh(mesh):
    lowered = _timed(timings, "train_step_lower", lambda: step.lower(state, abstract_batch(cfg, model_cfg, mesh)))
    compiled = _timed(timings, "train_step_compile", lowered.compile)
  return compiled, model_cfg, trainable_components(state.params)


def compile_rollouts(cfg: TrainConfig, mesh: Mesh) -> tuple[Any, Any]:
  """(compiled admission, compiled decode) of GRPO's rollout engine as the trainer builds it: a prompt of
  `data.max_length` tokens with an image admitted, and a decode call of every slot (`grpo.rollout_slots`,
  default one per rollout), with the policy's variables whole on every device of the batch axes, as rollouts
  hold them (`grpo.ROLLOUT_REPLICATED`)."""
  graphdef, state, _, _, _, _ = abstract_run(cfg, mesh)
  policy = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
      mesh, without_axes(x.sharding.spec, ROLLOUT_REPLICATED))), nnx.merge_state(state.params, state.frozen))
  rows = cfg.global_batch_size * cfg.grpo.group_size
  engine = Engine(nnx.merge(graphdef, policy), slots=cfg.grpo.rollout_slots or rows, mesh=mesh, attention="xla",
                  max_seq_len=cfg.data.max_length + cfg.grpo.max_new_tokens, allocate=False)
  bucket = min(sampling.bucket_length(cfg.data.max_length), engine.max_seq_len - 1)
  admit, decode = engine.lower(policy, prompt_length=bucket, image=True)
  return admit.compile(), decode.compile()


def compile_sampler(cfg: TrainConfig, mesh: Mesh, timings: dict[str, float] | None = None) -> tuple[Any, Any]:
  """(compiled prefill, compiled decode) of the sampler for the run's final evaluation: `global_batch_size` rows in
  the prompt bucket of `data.max_length`, `eval.max_new_tokens` decode slots, greedy. Inference keeps the model in
  its compute dtype. `timings` gets the seconds of '{prefill,decode}_{lower,compile}'."""
  base = checkpoint.read_info(cfg.model.init).config if cfg.model.init else None
  model_cfg = load_config(cfg.model.flashvl_config(base), [f"param_dtype={cfg.model.compute_dtype}"])
  sampler = sampling.Sampler(nnx.eval_shape(lambda: FlashVLModel(model_cfg, rngs=nnx.Rngs(0))), mesh)
  new_tokens = cfg.eval.max_new_tokens
  prompt = batch_shapes(cfg.global_batch_size, sampling.bucket_length(cfg.data.max_length), model_cfg,
                        ("input_ids", "attention_mask"))
  prompt = abstract(prompt, lambda ndim: batch_sharding(mesh, ndim))
  state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), sampler.state,
                       state_shardings(sampler.state, mesh))
  replicate = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=replicated(mesh))
  knobs = tuple(replicate(x) for x in sampling.SamplingParams().arrays())
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(mesh))
  stop_ids = replicate(np.zeros(sampling.STOP_SLOTS, np.int32))
  with jax.set_mesh(mesh):
    lowered = _timed(timings, "prefill_lower", lambda: sampler._prefill.lower(
        state, prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"], prompt["image_patch_index"],
        rng, knobs, stop_ids, decode_length=sampling.bucket_length(new_tokens, sampling.MIN_DECODE_BUCKET),
        do_sample=False, attention="xla"))
    prefill = _timed(timings, "prefill_compile", lowered.compile)
    carry = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), prefill.out_info,
                         prefill.output_shardings)
    lowered = _timed(timings, "decode_lower", lambda: sampler._decode.lower(
        state, carry, replicate(np.int32(0)), knobs, stop_ids, do_sample=False, attention="xla"))
    decode = _timed(timings, "decode_compile", lowered.compile)
  return prefill, decode


def memory_report(compiled: Any) -> dict[str, float]:
  """Per-device GiB of a compiled executable; the peak counts donated (aliased) outputs once."""
  m = compiled.memory_analysis()
  report = {"arguments_gib": m.argument_size_in_bytes / GIB, "outputs_gib": m.output_size_in_bytes / GIB,
            "aliased_gib": m.alias_size_in_bytes / GIB, "temporaries_gib": m.temp_size_in_bytes / GIB,
            "code_gib": m.generated_code_size_in_bytes / GIB}
  report["peak_gib"] = (report["arguments_gib"] + report["outputs_gib"] - report["aliased_gib"] +
                        report["temporaries_gib"] + report["code_gib"])
  return report


def describe(name: str, report: dict[str, float]) -> str:
  return (f"{name}: arguments {report['arguments_gib']:.2f} GiB, outputs {report['outputs_gib']:.2f} GiB (aliased "
          f"{report['aliased_gib']:.2f}), temporaries {report['temporaries_gib']:.2f} GiB, code "
          f"{report['code_gib']:.3f} GiB -> peak ~{report['peak_gib']:.2f} GiB per device")


def compile_for_topology(cfg: TrainConfig, topology: str) -> dict[str, dict[str, float]]:
  """Compiles the train step and what generates for `topology`; prints (and returns) per-device memory and
  FLOPs."""
  devices = topology_devices(topology)
  mesh = make_mesh(dataclasses.asdict(cfg.mesh), devices=devices)
  compiled, model_cfg, trains = compile_train_step(cfg, mesh)
  spec = OBJECTIVES[cfg.objective]
  if spec.generates_by_rollouts:  # what generates: GRPO's rollout engine, else the final evaluation's sampler
    generation = dict(zip(("rollout_admit", "rollout_decode"), compile_rollouts(cfg, mesh)))
  else:
    generation = dict(zip(("prefill", "decode"), compile_sampler(cfg, mesh)))
  rows, length = spec.model_rows(cfg)
  per_row = spec.lm_head_tokens_per_row(cfg)
  model_flops = flops.train_step_flops(model_cfg, trains, tiles=rows * tiling.max_tiles(model_cfg),
                                       image_tokens=rows * tiling.max_image_tokens(model_cfg), tokens=rows * length,
                                       sum_sq_lengths=rows * length**2,
                                       lm_head_tokens=None if per_row is None else rows * per_row)
  report = {name: memory_report(c) for name, c in {"train_step": compiled, **generation}.items()}
  report["train_step"].update(xla_tflops_per_device=compiled.cost_analysis().get("flops", 0.0) / 1e12,
                              model_tflops_per_device=model_flops / len(devices) / 1e12)
  print(f"{cfg.name} ({cfg.objective}) on {topology} ({devices[0].device_kind}, {len(devices)} chips), mesh "
        f"{dict(mesh.shape)}, global batch {rows} x {length} tokens, {cfg.grad_accum_steps} micro-batches, remat "
        f"{cfg.model.remat}, compute {cfg.model.compute_dtype}")
  for name, r in report.items():
    print(describe(name, r))
  train = report["train_step"]
  print(f"train step per device: {train['xla_tflops_per_device']:.4g} TFLOP (XLA, which counts a scanned layer once), "
        f"{train['model_tflops_per_device']:.4g} TFLOP (model, padding counted)")
  peak = cfg.metrics.peak_flops_per_device or flops.peak_flops_per_device(devices[0].device_kind)
  if peak:
    print(f"at {peak / 1e12:.0f} TFLOP/s per chip: >= {model_flops / len(devices) / peak:.3g} s per train step")
  return report
