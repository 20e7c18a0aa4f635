"""The Flash-VL trainer, top to bottom: config -> mesh -> model -> data -> jitted step -> eval -> checkpoints.

`train(cfg)` runs one stage with one objective: SFT (stages 1-4, SFT-LoRA), DPO (stage 5) or GRPO. What differs
between them (records, loss, step, final report) is the objective's spec (`objectives.OBJECTIVES`); the jitted
steps are shared (`steps`). Parameters are float32 (master weights); the model computes in
`model.compute_dtype`. With a `lora` section, adapters are added before training and merged into the saved
model. Every process feeds its own slice of the batch; only process 0 logs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from flashvl_jax import checkpoint, integrity
from flashvl_jax.api import FlashVL
from flashvl_jax.compilation_cache import enable_compilation_cache
from flashvl_jax.config import ConfigError, FlashVLConfig, to_dict
from flashvl_jax.errors import PathExistsError
from flashvl_jax.data.pipeline import SKIP_KINDS, SkipLimits, SkipStats, make_dataset
from flashvl_jax.data.sources import DataError
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.models.layers import set_remat
from flashvl_jax.preprocess.processor import Processor
from flashvl_jax.preprocess.tokenizer import Tokenizer, load_tokenizer
from flashvl_jax.sharding import create_sharded, make_mesh
from flashvl_jax.train import flops, step_model
from flashvl_jax.train.config import DistributedConfig, LoraConfig, ModelConfig, TrainConfig
from flashvl_jax.train.data_sources import Sources, open_sources
from flashvl_jax.train.dpo import check_lora_only
from flashvl_jax.train.evaluation import generation_accuracy, show_answers
from flashvl_jax.train.lora import add_lora, merge_lora
from flashvl_jax.train.metrics import MetricsLogger, Throughput
from flashvl_jax.train.objective_spec import StepParts
from flashvl_jax.train.objectives import OBJECTIVES
from flashvl_jax.train.optimizer import check_patterns, make_optimizer, make_schedule, path_name
from flashvl_jax.train.state import Checkpointer, create_train_state
from flashvl_jax.train.steps import evaluate, make_eval_step, make_train_step
from flashvl_jax.weights.hf_io import param_shapes


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


def initialize_distributed(cfg: DistributedConfig) -> None:
  """`jax.distributed.initialize` for a multi-host run (a coordinator address, or `auto` detection)."""
  if cfg.coordinator_address is None and not cfg.auto:
    return
  jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                             initialization_timeout=cfg.initialization_timeout_s,
                             heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)


def build_model(cfg: ModelConfig, mesh: Mesh, lora: LoraConfig | None = None) -> FlashVLModel:
  """The model with float32 parameters laid out on `mesh`: random from the preset, or loaded from `cfg.init`;
  with LoRA adapters when `lora` is given.

  Call it outside `jax.set_mesh`, where `nnx.eval_shape` would resolve the logical axis names itself.
  """
  if cfg.init is None:
    model_cfg = cfg.flashvl_config()
    model = create_sharded(lambda: FlashVLModel(model_cfg, rngs=nnx.Rngs(cfg.seed)), mesh)
  else:
    saved_cfg = checkpoint.read_config(cfg.init)
    model_cfg = cfg.flashvl_config(saved_cfg)  # computes in compute_dtype
    check_same_shapes(saved_cfg, model_cfg, cfg.init)
    loaded, _ = checkpoint.load_model(cfg.init, dtype="float32", mesh=mesh)
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: FlashVLModel(model_cfg, rngs=nnx.Rngs(0)))),
                      nnx.state(loaded))
  if lora is not None:
    add_lora(model, lora)
  set_remat(model, cfg.remat)
  return model


def check_same_shapes(saved: FlashVLConfig, wanted: FlashVLConfig, init: str) -> None:
  """`model.overrides` on top of `model.init` may change settings (tiling, dtype, ...) but not parameter shapes."""
  shapes = lambda c: param_shapes(nnx.eval_shape(lambda: FlashVLModel(c, rngs=nnx.Rngs(0))))
  before, after = shapes(saved), shapes(wanted)
  changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
  if changed:
    shown = ", ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in changed[:3])
    raise ConfigError(f"model.overrides change the shapes of {len(changed)} parameters of the model.init checkpoint "
                      f"{init} ({shown}{', ...' if len(changed) > 3 else ''}); with model.init, overrides may change "
                      "settings such as tiling but not sizes: drop the size overrides or train from scratch "
                      "(model.init=null)")


def check_vocabulary(tokenizer: Tokenizer, model_cfg: FlashVLConfig) -> None:
  if tokenizer.vocab_size > model_cfg.llm.vocab_size:
    raise ConfigError(f"data.tokenizer has {tokenizer.vocab_size} token ids but the model's llm.vocab_size is "
                      f"{model_cfg.llm.vocab_size}: ids past it have no embedding. Use the tokenizer the model was "
                      "trained with, or a model whose vocabulary covers it")


@dataclasses.dataclass
class Datasets:
  train: Any  # grain IterDataset of this process's batches, repeating
  skipped: SkipStats  # bad training samples this process skipped
  eval: Any | None  # finite grain IterDataset, or None
  eval_batches: int  # batches every process reads per eval
  eval_batch_size: int  # per process
  train_size: int
  eval_records: Any | None  # the eval source, for generation (conversations)


def build_data(cfg: TrainConfig, processor: Processor, sources: Sources, records: str) -> Datasets:
  """This process's train and eval pipelines of `records` ('conversation' / 'preference'); the global batch is
  split evenly over processes."""
  d = cfg.data
  train_src, eval_src = sources.train, sources.eval
  processes = jax.process_count()
  if cfg.global_batch_size % processes:
    raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by the {processes} processes")
  for name, src in (("data.path", train_src), ("held-out data", eval_src)):
    if src is not None and len(src) < processes:
      raise DataError(f"{name} {src!r} holds {len(src)} records; every one of the {processes} processes needs "
                      "at least one")
  common = dict(num_threads=d.num_threads, num_workers=d.num_workers, packing=d.packing,
                records=records,
                bad_sample_policy=d.bad_sample_policy,
                skip_limits=SkipLimits(max_consecutive=d.max_consecutive_skips, max_fraction=d.max_skip_fraction))
  skipped = SkipStats()
  train = make_dataset(train_src, processor, batch_size=cfg.global_batch_size // processes, seed=d.seed,
                       shuffle=d.shuffle, num_epochs=None, prefetch=d.prefetch, skip_stats=skipped, **common)
  eval_ds, eval_batches, eval_batch = None, 0, 0
  if eval_src is not None:
    eval_batch = (cfg.eval.batch_size or cfg.global_batch_size) // processes
    eval_ds = make_dataset(eval_src, processor, batch_size=eval_batch, shuffle=False, num_epochs=1,
                           drop_remainder=False, **common)
    eval_batches = math.ceil((len(eval_src) // processes) / eval_batch)  # the same count on every process
  questions = eval_src if records == "conversation" else None
  return Datasets(train, skipped, eval_ds, eval_batches, eval_batch, len(train_src), questions)


def trainable_components(params: nnx.State) -> dict[str, bool]:
  """Which of vit / adp / llm hold a trainable parameter (for the FLOP count)."""
  names = [path_name(p) for p, _ in nnx.to_flat_state(params)]
  return {c: any(n.startswith(c + ".") for n in names) for c in flops.COMPONENTS}


def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
  """Runs a training stage. Returns `{"step", "train": last metrics, "eval": final eval or None, "model": FlashVL}`."""
  initialize_distributed(cfg.distributed)
  enable_compilation_cache(cfg.compilation_cache_dir)
  mesh = make_mesh(dataclasses.asdict(cfg.mesh))
  # these two before minutes of model building
  sources = open_sources(cfg.data, OBJECTIVES[cfg.objective].records)
  integrity.probe_writable(cfg.output_dir, "output directory")
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  model = build_model(cfg.model, mesh, cfg.lora)
  check_vocabulary(tokenizer, model.config)
  processor = Processor(model.config, tokenizer, max_length=cfg.data.max_length)
  with jax.set_mesh(mesh):  # activation sharding constraints resolve against it
    return _train(cfg, mesh, model, processor, sources, resume)


def _train(cfg: TrainConfig, mesh: Mesh, model: FlashVLModel, processor: Processor, sources: Sources,
           resume: bool) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  out = pathlib.Path(cfg.output_dir)
  spec = OBJECTIVES[cfg.objective]
  check_patterns(model, cfg.optimizer.trainable)
  data = build_data(cfg, processor, sources, spec.records)
  total_steps = cfg.steps or cfg.epochs * data.train_size // cfg.global_batch_size
  schedule = make_schedule(cfg.optimizer, total_steps)
  tx = make_optimizer(cfg.optimizer, schedule)
  graphdef, state, shardings = create_train_state(model, cfg.optimizer.trainable, tx, mesh,
                                                  frozen_dtype=cfg.model.frozen_dtype)
  if spec.needs_lora:
    check_lora_only(state.params, spec.name.upper())
  model_cfg = model.config
  objective = spec.loss(cfg)
  train_step = make_train_step(graphdef, tx, schedule, shardings, mesh, objective,
                               grad_accum_steps=cfg.grad_accum_steps, dropout_seed=cfg.model.seed)
  run_step = spec.make_step(StepParts(cfg, graphdef, state, shardings, mesh, train_step, processor.tokenizer))
  eval_step = None
  if spec.evaluates_by_loss and data.eval is not None:
    eval_step = make_eval_step(graphdef, shardings, mesh, objective)
  del model  # its arrays live on in `state`
  run_eval = lambda state: evaluate(eval_step, objective, state, itertools.islice(iter(data.eval), data.eval_batches),
                                    mesh)

  if cfg.checkpoint.restart and not resume:
    if is_main:
      shutil.rmtree(out / "checkpoints", ignore_errors=True)
    multihost_utils.sync_global_devices("checkpoints deleted")
  checkpointer = Checkpointer(out / "checkpoints", cfg.checkpoint)
  train_iter = iter(data.train)
  latest = checkpointer.latest_step()
  if latest is not None and not resume:
    raise PathExistsError(f"{out / 'checkpoints'} already holds checkpoint step {latest}; pass --resume to "
                          "continue it, checkpoint.restart=true to start over, or choose another output_dir")
  skipped: list[str] = []
  if latest is not None:
    latest, state, skipped = checkpointer.restore_newest(state, shardings, train_iter)
  start = int(state.step)
  if is_main:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    step_model.write_run_model_info(out, model_cfg, cfg.model.init)  # what exporting a step needs
  logger = MetricsLogger(out, total_steps, start, enabled=is_main)
  for reason in skipped:
    logger.print(f"skipped damaged checkpoint {reason} (renamed to <step>.damaged)")
  if latest is not None:
    logger.print(f"resumed from checkpoint step {latest}")

  trains = trainable_components(state.params)
  throughput = Throughput(
      lambda m: flops.train_step_flops(model_cfg, trains, tiles=m["tiles"], image_tokens=m["image_tokens"],
                                       tokens=m["tokens"], sum_sq_lengths=m["sum_sq_lengths"],
                                       lm_head_tokens=m["target_tokens"] if cfg.max_target_tokens else None),
      jax.device_count(), cfg.metrics.peak_flops_per_device or flops.peak_flops_per_device(jax.devices()[0].device_kind))
  metrics: dict[str, float] = {}
  try:
    for step in range(start + 1, total_steps + 1):
      local = next(train_iter)
      spec.check_batch(cfg, local)
      state, metrics = run_step(state, local)
      if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
        checkpointer.wait()  # so that the message names the newest checkpoint
        raise NonFiniteLossError(
            f"the loss is {metrics['loss']} (gradient norm {metrics['grad_norm']}) at step {step}; stopped without "
            f"saving it. The last good checkpoint is step {checkpointer.latest_step()} in {out / 'checkpoints'} "
            "(lower the learning rate and --resume)")
      metrics.update(throughput(metrics))
      metrics.update(skip_metrics(data.skipped))
      logger.progress(step, metrics)
      if step % cfg.metrics.log_every_steps == 0 or step == total_steps:
        logger.write(step, metrics)
      if eval_step is not None and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
        periodic = run_eval(state)
        logger.write(step, periodic, prefix="eval")
        logger.print(f"step {step} eval " + ", ".join(f"{k}: {v:.4g}" for k, v in periodic.items()))
      if step % cfg.checkpoint.every_steps == 0 or step == total_steps:
        checkpointer.save(step, state, train_iter)
    checkpointer.close()
  except BaseException:  # no half-written checkpoint left, and the progress bar ends before the error is printed
    checkpointer.abandon()
    logger.close()
    raise

  module = nnx.merge(graphdef, state.params, state.frozen)
  if cfg.lora is not None:
    module = merge_lora(module)
  metadata = {**step_model.run_source(out), "step": total_steps, "run": cfg.name}  # the init's HF layout kept
  checkpoint.save_model(out / "model", module, metadata=metadata, carried=step_model.run_carried(out), overwrite=True)
  model = FlashVL(module, processor, mesh)
  final = run_eval(state) if eval_step is not None else {}
  single = jax.process_count() == 1  # the sampler runs in one process
  if data.eval_records is not None and cfg.eval.accuracy and single:
    final["accuracy"] = generation_accuracy(model, data.eval_records, batch_size=data.eval_batch_size,
                                            max_new_tokens=cfg.eval.max_new_tokens)
  if final:
    logger.write(total_steps, final, prefix="eval")
    logger.print("eval " + ", ".join(f"{k}: {v:.4g}" for k, v in final.items()))
    if spec.report(final):
      logger.print(spec.report(final))
  if data.eval_records is not None and cfg.demo_questions and single:
    show_answers(model, data.eval_records, cfg.demo_questions, cfg.eval.max_new_tokens, logger.print)
  if metrics.get("skipped"):
    logger.print(f"skipped {metrics['skipped']:.0f} bad training samples: " + ", ".join(
        f"{kind} {metrics['skipped_' + kind]:.0f}" for kind in SKIP_KINDS if metrics["skipped_" + kind]))
  logger.print(f"model checkpoint: {out / 'model'}")
  logger.close()
  return {"step": total_steps, "train": metrics, "eval": final or None, "model": model}


def skip_metrics(stats: SkipStats) -> dict[str, float]:
  """`skipped` and `skipped_<kind>`: bad training samples skipped so far (since the start or resume), summed over
  processes (every process calls this at every step; the step has synchronised them already)."""
  counts = np.asarray([stats.counts[kind] for kind in SKIP_KINDS], np.int64)
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  return {"skipped": float(counts.sum()), **{f"skipped_{kind}": float(n) for kind, n in zip(SKIP_KINDS, counts)}}
