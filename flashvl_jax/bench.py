"""`python -m flashvl_jax.bench`: generation speed of our sampler and of PyTorch transformers on the same weights.

Protocol (the paper's): batch 1, one image, an MMMU-style multiple-choice question, 128 new tokens,
greedy, stop ids off so every run makes all 128. Per variant (static / dynamic / iss presets at full or tiny size)
a random PyTorch Flash-VL (`TorchFlashVL`: HF SigLIP or AIMv2, the adapter, HF Qwen2) is built, written in the
released layout and loaded by us, so both sides run the same weights on the same hardware.

  TTFT     processed inputs on the host -> first token on the host: image encoding + prefill + first sample
  TPOT     (total - TTFT) / (new tokens - 1)
  tok/s    new tokens / total (end to end, TTFT included)
  compile  first call minus a steady-state call (JAX only)
The image is a synthetic 896x896 picture: static 1 tile (256 tokens at full size), dynamic 2x2 + thumbnail
(1,280), iss 2x2 (576). Host preprocessing (tiling, tokenization) is timed apart and excluded. PyTorch runs
`llm.generate(inputs_embeds=...)` after the same image encoding (tiles -> ViT -> the same token gather ->
adapter), with transformers' default dynamic cache and attention. Also measured: batched decode throughput
(the prompt repeated B times; decode tokens/s, prefill excluded) and vision-tower images/s with MFU from
analytic FLOPs (`train.flops.vit_flops_per_tile`) against `--device-peak-tflops` (or the known peak of the
device). In fp32 the two sides' greedy tokens are compared as a functional check.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from flashvl_jax import sampling
from flashvl_jax.api import FlashVL, default_dtype
from flashvl_jax.cli import ArgumentParser, add_debug_flag, run_cli
from flashvl_jax.compilation_cache import enable_compilation_cache
from flashvl_jax.config import PRESETS_BY_SIZE, load_config
from flashvl_jax.environment import environment
from flashvl_jax.host_memory import peak_rss_gb
from flashvl_jax.models.layers import set_attention
from flashvl_jax.preprocess.image import normalize
from flashvl_jax.preprocess.processor import Processor
from flashvl_jax.testing.random_flashvl import save_reference, torch_reference
from flashvl_jax.train.flops import peak_flops_per_device, vit_flops_per_tile

IMAGE_SIZE = 896
# An MMMU-style question (MMMU prompts: a question, lettered options, "Answer with the option's letter ..."):
# 151 tokens, 176 text tokens with the chat template.
QUESTION = (
    "The figure shows the layout of a small manufacturing plant with four production lines (A, B, C and D), a "
    "shared warehouse and two loading docks. Each line produces a different component, and the arrows indicate "
    "the direction of material flow between the stations. Line A runs two shifts per day at 85% utilisation, "
    "line B runs one shift at 92% utilisation, and lines C and D share a single maintenance crew that can service "
    "only one line at a time. Based on the diagram and the information given, which production line is most likely "
    "to become the bottleneck if demand for the final assembled product increases by 30% next quarter?\n"
    "Options:\n(A) Line A\n(B) Line B\n(C) Line C\n(D) Line D\n"
    "Answer with the option's letter from the given choices directly.")


# ---------------------------------------------------------------------------------------------------------------
# The PyTorch reference


def torch_embed(ref, input_ids, pixel_values, image_patch_index):
  """Embeddings with image features at the placeholders, encoded like our model: tiles [B, n, 3, S, S] -> ViT ->
  the processor's patch gather (stitching + pixel shuffle) -> adapter."""
  import torch

  b, n = pixel_values.shape[:2]
  out = ref.vit(pixel_values=pixel_values.flatten(0, 1), output_hidden_states=ref.vision_feature == "pre_norm")
  feats = out.last_hidden_state if ref.vision_feature == "post_norm" else out.hidden_states[-1]
  feats = feats.reshape(b, n * feats.shape[1], feats.shape[2])
  image = ref.adp(feats[torch.arange(b, device=feats.device)[:, None, None], image_patch_index].flatten(2))
  embeds = ref.llm.get_input_embeddings()(input_ids.clamp(min=0))
  is_image = input_ids < 0
  slot = (is_image.cumsum(1) - 1).clamp(0, image.shape[1] - 1)
  at_slot = torch.gather(image, 1, slot[..., None].expand(-1, -1, image.shape[-1]))
  return torch.where(is_image[..., None], at_slot.to(embeds.dtype), embeds)


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def bench_image(size: int = IMAGE_SIZE) -> Image.Image:
  """A deterministic picture: colour gradients, a checkerboard and noise."""
  y, x = np.mgrid[0:size, 0:size] / size
  rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 200
  rgb[(np.floor(x * 8) + np.floor(y * 8)) % 2 == 0] += 40
  rgb += np.random.default_rng(0).normal(0, 8, rgb.shape)
  return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def _repeat_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  return {k: np.repeat(v, size, axis=0) for k, v in batch.items()}


def jax_generation(model: FlashVL, batch: dict[str, np.ndarray], new_tokens: int, repeats: int,
                   attention: str) -> dict[str, Any]:
  """TTFT / TPOT / tok/s of the sampler on `batch` (stop ids off), plus compile time and compilations."""
  sampler = model.sampler
  params = sampling.SamplingParams()
  traces = dict(sampler.trace_counts)

  def run() -> tuple[float, float, np.ndarray]:
    start = time.perf_counter()
    prompts = sampler.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                              batch["image_patch_index"], max_new_tokens=new_tokens)
    carry = jax.block_until_ready(sampler.prefill(prompts, params, stop_ids=(), attention=attention))
    ttft = time.perf_counter() - start
    carry = sampler.decode(carry, new_tokens, params, stop_ids=(), attention=attention)
    tokens = np.asarray(carry.tokens)
    return ttft, time.perf_counter() - start, tokens[:, :new_tokens]

  _, first_total, tokens = run()
  runs = [run() for _ in range(repeats)]
  ttft = statistics.median(r[0] for r in runs)
  total = statistics.median(r[1] for r in runs)
  compiled = {k: v - traces.get(k, 0) for k, v in sampler.trace_counts.items()}
  return dict(ttft_s=ttft, tpot_s=(total - ttft) / (new_tokens - 1), tokens_per_s=new_tokens / total,
              total_s=total, compile_s=first_total - total, compiled=compiled, tokens=tokens[0].tolist(),
              attention=sampling.resolve_attention(model.config, attention),
              decode_attention=sampling.resolve_attention(model.config, attention, decode=True))


def jax_decode_throughput(model: FlashVL, batch: dict[str, np.ndarray], batch_size: int, new_tokens: int,
                          attention: str) -> float:
  """Decode tokens/s over `batch_size` copies of the prompt (prefill excluded), after a warm-up run."""
  sampler = model.sampler
  params = sampling.SamplingParams()
  rows = _repeat_batch(batch, batch_size)
  prompts = sampler.prepare(rows["input_ids"], rows["attention_mask"], rows["pixel_values"],
                            rows["image_patch_index"], max_new_tokens=new_tokens)

  def run() -> float:
    carry = jax.block_until_ready(sampler.prefill(prompts, params, stop_ids=(), attention=attention))
    seconds, _ = _timed(lambda: jax.block_until_ready(sampler.decode(carry, new_tokens, params, stop_ids=(),
                                                                             attention=attention)))
    return seconds

  run()
  return batch_size * (new_tokens - 1) / run()


def jax_vision(model: FlashVL, tiles: np.ndarray, repeats: int, attention: str) -> float:
  """Vision-tower images (tiles) per second on a batch of uint8 tiles [N, S, S, 3], with the prefill's
  attention implementation."""
  sampler = model.sampler
  kind = model.config.vision.kind
  implementation = sampling.resolve_attention(model.config, attention)

  @jax.jit
  def encode(state, pixels):
    vit = nnx.merge(sampler.graphdef, state).vit
    set_attention(vit, implementation)
    return vit.forward_features(normalize(pixels, kind))[1]

  pixels = jnp.asarray(tiles)
  jax.block_until_ready(encode(sampler.state, pixels))
  seconds = statistics.median(
      _timed(lambda: jax.block_until_ready(encode(sampler.state, pixels)))[0] for _ in range(repeats))
  return len(tiles) / seconds


@dataclasses.dataclass
class TorchInputs:
  input_ids: Any
  attention_mask: Any
  pixel_values: Any
  image_patch_index: Any


def torch_inputs(batch: dict[str, np.ndarray], kind: str, dtype, device) -> TorchInputs:
  """The processor's batch (right-padded; one row or equal rows) as torch tensors, pixels normalised NCHW."""
  import torch

  length = int(batch["attention_mask"].sum(axis=1).max())
  pixels = np.asarray(normalize(batch["pixel_values"], kind)).transpose(0, 1, 4, 2, 3)
  return TorchInputs(torch.from_numpy(batch["input_ids"][:, :length].astype(np.int64)).to(device),
                     torch.from_numpy(batch["attention_mask"][:, :length].astype(np.int64)).to(device),
                     torch.from_numpy(np.ascontiguousarray(pixels)).to(device, dtype),
                     torch.from_numpy(batch["image_patch_index"].astype(np.int64)).to(device))


def torch_generation(ref, inputs: TorchInputs, new_tokens: int, repeats: int) -> dict[str, Any]:
  """TTFT, TPOT and total of transformers, all from one `new_tokens` generate per run (medians of `repeats`).

  A logits processor stamps the time each step's logits are ready (after a device sync): the first stamp ends the
  TTFT (image encoding + prefill), the rest of the run divided by the remaining tokens is the TPOT, so neither can
  come out negative.
  """
  import torch
  from transformers import LogitsProcessor, LogitsProcessorList

  device = inputs.input_ids.device
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

  class Stamps(LogitsProcessor):

    def __init__(self):
      self.times: list[float] = []

    def __call__(self, input_ids, scores):
      sync()
      self.times.append(time.perf_counter())
      return scores

  def run() -> tuple[float, float, Any]:
    stamps = Stamps()
    start = time.perf_counter()
    with torch.inference_mode():
      embeds = torch_embed(ref, inputs.input_ids, inputs.pixel_values, inputs.image_patch_index)
      out = ref.llm.generate(inputs_embeds=embeds, attention_mask=inputs.attention_mask, do_sample=False,
                             max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                             logits_processor=LogitsProcessorList([stamps]))
    sync()
    total = time.perf_counter() - start
    if out.shape[1] != new_tokens or len(stamps.times) != new_tokens:
      raise RuntimeError(f"transformers generated {out.shape[1]} tokens instead of {new_tokens}")
    return stamps.times[0] - start, total, out

  ref.llm.generation_config.eos_token_id = None
  run()  # warm-up
  runs = [run() for _ in range(repeats)]
  ttft = statistics.median(r[0] for r in runs)
  tpot = statistics.median((r[1] - r[0]) / (new_tokens - 1) for r in runs)
  total = statistics.median(r[1] for r in runs)
  return dict(ttft_s=ttft, tpot_s=tpot, tokens_per_s=new_tokens / total, total_s=total, tokens=runs[0][2][0].tolist())


def torch_decode_throughput(ref, inputs: TorchInputs, batch_size: int, new_tokens: int) -> float:
  import torch

  rows = TorchInputs(*(x.repeat_interleave(batch_size, dim=0) for x in dataclasses.astuple(inputs)))
  device = rows.input_ids.device
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

  def generate(n: int) -> float:
    def call():
      with torch.inference_mode():
        embeds = torch_embed(ref, rows.input_ids, rows.pixel_values, rows.image_patch_index)
        ref.llm.generate(inputs_embeds=embeds, attention_mask=rows.attention_mask, do_sample=False, max_new_tokens=n,
                         eos_token_id=None, pad_token_id=0)
      sync()
    return _timed(call)[0]

  generate(2)  # warm-up
  return batch_size * (new_tokens - 1) / (generate(new_tokens) - generate(1))


def torch_vision(ref, tiles: np.ndarray, kind: str, dtype, device, repeats: int) -> float:
  import torch

  pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(normalize(tiles, kind)).transpose(0, 3, 1, 2)))
  pixels = pixels.to(device, dtype)
  sync = torch.cuda.synchronize if pixels.device.type == "cuda" else (lambda: None)

  def call():
    with torch.inference_mode():
      ref.vit(pixel_values=pixels)
    sync()

  call()
  return len(tiles) / statistics.median(_timed(call)[0] for _ in range(repeats))


# ---------------------------------------------------------------------------------------------------------------
# Driver


def run_variant(variant: str, preset: str, args: argparse.Namespace, workdir: pathlib.Path) -> dict[str, Any]:
  import torch

  # The previous variant's model is cyclic garbage (its Sampler holds jitted bound methods): collect it now, or
  # it would share the host with this variant's PyTorch model (20 GB peak at full size in fp32 instead of 11).
  gc.collect()

  cfg = load_config(preset)
  torch_dtype = getattr(torch, args.dtype)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  processor = Processor.from_preset(cfg)
  image = bench_image()
  preprocess_s, batch = _timed(lambda: processor([image], [[{"role": "user", "content": QUESTION}]],
                                                 add_generation_prompt=True))
  prompt_tokens = int(batch["attention_mask"].sum())
  result: dict[str, Any] = dict(variant=variant, preset=preset, dtype=args.dtype, prompt_tokens=prompt_tokens,
                                image_tokens=int(batch["num_image_tokens"][0]),
                                tiles=int(batch["tile_mask"].sum()), preprocess_s=preprocess_s,
                                new_tokens=args.new_tokens)
  tiles = np.repeat(batch["pixel_values"][0, :1], args.vision_batch, axis=0)

  # PyTorch first, freed before our model loads: at full size in fp32 both would not fit a small host together.
  ref = torch_reference(cfg, dtype=args.dtype, seed=args.seed)
  path = save_reference(ref, cfg, workdir / variant)
  if not args.skip_torch:
    ref = ref.to(device)
    inputs = torch_inputs(batch, cfg.vision.kind, torch_dtype, device)
    result["torch"] = torch_generation(ref, inputs, args.new_tokens, args.repeats)
    result["torch"]["decode_tokens_per_s"] = {
        b: torch_decode_throughput(ref, inputs, b, args.new_tokens) for b in args.batch_sizes}
    result["torch"]["vision_images_per_s"] = torch_vision(ref, tiles, cfg.vision.kind, torch_dtype, device,
                                                          args.repeats)
  result["peak_rss_gb_after_torch"] = peak_rss_gb()
  del ref
  gc.collect()
  if device == "cuda":
    torch.cuda.empty_cache()

  from flashvl_jax.weights.flashvl import load_flashvl  # pylint: disable=import-outside-toplevel

  model = FlashVL(load_flashvl(path, dtype=args.dtype, tiling=cfg.tiling), processor)
  shutil.rmtree(path)  # read into memory; at full size each variant's fp32 checkpoint is 8-9 GB of disk
  result["jax"] = jax_generation(model, batch, args.new_tokens, args.repeats, args.attention)
  result["jax"]["decode_tokens_per_s"] = {
      b: jax_decode_throughput(model, batch, b, args.new_tokens, args.attention) for b in args.batch_sizes}
  result["jax"]["vision_images_per_s"] = jax_vision(model, tiles, args.repeats, args.attention)
  result["peak_rss_gb"] = peak_rss_gb()
  peak = args.device_peak_tflops * 1e12 if args.device_peak_tflops else peak_flops_per_device(
      jax.devices()[0].device_kind)
  result["vision_flops_per_image"] = vit_flops_per_tile(cfg)
  for side in ("jax", "torch"):
    if side in result:
      achieved = result[side]["vision_images_per_s"] * result["vision_flops_per_image"]
      result[side]["vision_mfu"] = None if peak is None else achieved / peak
  if "torch" in result:
    j, t = result["jax"], result["torch"]
    result["speedup"] = dict(ttft=t["ttft_s"] / j["ttft_s"], tpot=t["tpot_s"] / j["tpot_s"],
                             tokens_per_s=j["tokens_per_s"] / t["tokens_per_s"],
                             vision=j["vision_images_per_s"] / t["vision_images_per_s"],
                             **{f"decode_b{b}": j["decode_tokens_per_s"][b] / t["decode_tokens_per_s"][b]
                                for b in args.batch_sizes})
    same = next((i for i, (a, b) in enumerate(zip(j["tokens"], t["tokens"])) if a != b), len(j["tokens"]))
    result["same_greedy_prefix"] = same
  return result


def format_result(r: dict[str, Any]) -> str:
  """A short human-readable table of one variant's result."""
  lines = [f"== {r['variant']} ({r['preset']}, {r['dtype']}): prompt {r['prompt_tokens']} tokens "
           f"({r['image_tokens']} image tokens, {r['tiles']} tiles), {r['new_tokens']} new tokens; host "
           f"preprocessing {r['preprocess_s'] * 1e3:.1f} ms"]
  sides = [s for s in ("jax", "torch") if s in r]
  row = lambda name, fmt, key: f"  {name:<22}" + "".join(f"{fmt(r[s][key]):>14}" for s in sides)
  lines.append(f"  {'':<22}" + "".join(f"{s:>14}" for s in sides))
  lines.append(row("TTFT (ms)", lambda v: f"{v * 1e3:.2f}", "ttft_s"))
  lines.append(row("TPOT (ms)", lambda v: f"{v * 1e3:.2f}", "tpot_s"))
  lines.append(row("tokens/s (e2e)", lambda v: f"{v:.1f}", "tokens_per_s"))
  for b in r["jax"]["decode_tokens_per_s"]:
    lines.append(f"  {f'decode tok/s, batch {b}':<22}" + "".join(
        f"{r[s]['decode_tokens_per_s'][b]:>14.1f}" for s in sides))
  lines.append(row("vision images/s", lambda v: f"{v:.1f}", "vision_images_per_s"))
  lines.append(row("vision MFU", lambda v: "n/a" if v is None else f"{v * 100:.2f}%", "vision_mfu"))
  lines.append(f"  JAX compile {r['jax']['compile_s']:.1f} s ({r['jax']['compiled']}), attention: prefill "
               f"{r['jax']['attention']}, decode {r['jax']['decode_attention']}" +
               ("" if r["jax"]["vision_mfu"] is not None else "; MFU needs --device-peak-tflops on this device"))
  lines.append(f"  peak host RSS of this process so far: {r['peak_rss_gb_after_torch']:.2f} GB after PyTorch's side, "
               f"{r['peak_rss_gb']:.2f} GB after ours")
  if "speedup" in r:
    lines.append("  JAX / PyTorch: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup"].items()))
    lines.append(f"  greedy tokens identical for the first {r['same_greedy_prefix']} of {r['new_tokens']}")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = ArgumentParser(prog="python -m flashvl_jax.bench", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=tuple(PRESETS_BY_SIZE), default="tiny", help="model presets (default tiny)")
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                      help="parameters and compute, both sides (auto: float32 on CPU, bfloat16 on GPU)")
  parser.add_argument("--variants", default="static,dynamic,iss", help="comma-separated: static, dynamic, iss")
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is reported)")
  parser.add_argument("--batch-sizes", default="1,8,32", help="batched decode throughput at these batch sizes")
  parser.add_argument("--vision-batch", type=int, default=8, help="tiles per vision-tower call")
  parser.add_argument("--device-peak-tflops", type=float, help="peak TFLOP/s of one device for MFU")
  parser.add_argument("--attention", choices=sampling.ATTENTION_CHOICES, default="auto",
                      help="attention implementation (default auto: looped on CPU, cuDNN for a GPU's prefill)")
  parser.add_argument("--skip-torch", action="store_true", help="measure our sampler only")
  parser.add_argument("--seed", type=int, default=0, help="random weights")
  parser.add_argument("--json", type=pathlib.Path, help="write the results (and the environment) here")
  parser.add_argument("--compilation-cache", metavar="DIR",
                      help="persistent compilation cache (default $JAX_COMPILATION_CACHE_DIR): a rerun skips XLA")
  add_debug_flag(parser)
  args = parser.parse_args(argv)
  args.dtype = default_dtype() if args.dtype == "auto" else args.dtype
  args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = set(args.variants) - set(PRESETS_BY_SIZE[args.size])
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(PRESETS_BY_SIZE[args.size])}")
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
  if args.new_tokens < 2:
    parser.error("--new-tokens must be >= 2 (TPOT needs a decode step)")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--compile" in argv:  # the compile-time and memory benchmark (its own flags)
    from flashvl_jax import compile_bench
    return compile_bench.main([a for a in argv if a != "--compile"])
  if "--serve" in argv:  # the server under concurrent clients (its own flags)
    from flashvl_jax import serve_bench
    return serve_bench.main([a for a in argv if a != "--serve"])
  if "--rollouts" in argv:  # GRPO rollouts, engine vs static generate (its own flags)
    from flashvl_jax import rollout_bench
    return rollout_bench.main([a for a in argv if a != "--rollouts"])
  # PyTorch shares the accelerator: JAX must not reserve most of its memory up front. Effective only when this
  # runs before JAX first touches a device (as under `python -m flashvl_jax.bench`).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  args = parse_args(argv)
  return run_cli(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
  enable_compilation_cache(args.compilation_cache)
  env = environment()
  print(f"{env['date']}  {env['device']} x{env['device_count']} ({env['jax_backend']}), CPU {env['cpu']} "
        f"({env['cpu_cores']} cores); jax {env['jax']}, flax {env['flax']}, torch {env['torch']} on "
        f"{env['torch_device']}, transformers {env['transformers']}", flush=True)
  results = []
  with tempfile.TemporaryDirectory(prefix="flashvl_bench_") as workdir:
    for variant in args.variants:
      result = run_variant(variant, PRESETS_BY_SIZE[args.size][variant], args, pathlib.Path(workdir))
      print(format_result(result), flush=True)
      results.append(result)
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps(dict(environment=env, settings=settings, results=results), indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
