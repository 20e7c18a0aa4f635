"""`python -m flashvl_jax.bench --serve`: the server under N concurrent clients vs sequential `generate`.

One command, one random model (a preset's shapes, written as a Hugging Face checkpoint), one machine:
1. baseline: the same requests one after another through `FlashVL.generate` (batch 1) in this process;
2. the server (`python -m flashvl_jax.serve`, a child process) with N clients (coroutines streaming over HTTP)
   for each N in --clients; each client sends --requests-per-client requests back to back.
The workload: text prompts of mixed lengths and, every other request, an image; greedy; --new-tokens each (a
random model rarely stops early; the token counts come from each response's usage). Reported per level:
throughput (completion tokens / wall time), its ratio to the baseline, time to first token (p50 / p99) and
time per output token (p50) as clients see them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import pathlib
import statistics
import tempfile
import time
from typing import Any, Sequence

import httpx
import numpy as np
from PIL import Image

from flashvl_jax.api import FlashVL, default_dtype
from flashvl_jax.environment import environment
from flashvl_jax.testing.random_flashvl import write_random_checkpoint
from flashvl_jax.cli import ArgumentParser, add_debug_flag, run_cli
from flashvl_jax.config import PRESETS_BY_SIZE
from flashvl_jax.sampling import bucket_length
from flashvl_jax.serve.process import ServerProcess


def workload(count: int, seed: int = 0) -> list[tuple[str, Image.Image | None]]:
  rng = np.random.default_rng(seed)
  cases = []
  for i in range(count):
    text = " ".join(["word"] * int(rng.integers(4, 80))) + f" Question {i}: what do you see?"
    image = (Image.fromarray(rng.integers(0, 256, (int(rng.integers(64, 400)), int(rng.integers(64, 400)), 3),
                                          np.uint8)) if i % 2 else None)
    cases.append((text, image))
  return cases


def content(text: str, image: Image.Image | None) -> Any:
  if image is None:
    return text
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
  return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def sequential(model: FlashVL, cases, new_tokens: int) -> dict[str, float]:
  """Throughput of batch-1 `generate` calls one after another (stop ids off: every call makes new_tokens)."""
  batches = [model.processor([image], [[{"role": "user", "content": text}]], add_generation_prompt=True)
             for text, image in cases]
  kinds = {}  # one call per (prompt bucket, image or not) compiles everything the timed loop runs
  for batch in batches:
    kinds.setdefault((bucket_length(int(batch["attention_mask"].sum())), bool(batch["tile_mask"].any())), batch)
  for batch in kinds.values():
    model.generate(**batch, max_new_tokens=new_tokens, stop_ids=())
  start = time.perf_counter()
  tokens = sum(len(model.generate(**batch, max_new_tokens=new_tokens, stop_ids=())[0]) for batch in batches)
  seconds = time.perf_counter() - start
  return {"requests": len(batches), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


async def one_request(client: httpx.AsyncClient, text: str, image, new_tokens: int) -> dict[str, float]:
  body = {"messages": [{"role": "user", "content": content(text, image)}], "max_tokens": new_tokens,
          "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
  start = time.perf_counter()
  first = last = None
  tokens = 0
  async with client.stream("POST", "/v1/chat/completions", json=body) as response:
    response.raise_for_status()
    async for line in response.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[len("data: "):])
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
        last = time.perf_counter()
        first = first or last
  first, last = first or time.perf_counter(), last or time.perf_counter()
  return {"ttft": first - start, "tpot": (last - first) / max(tokens - 1, 1), "tokens": tokens}


async def _clients(url: str, jobs, clients: int, per_client: int, new_tokens: int) -> list[dict[str, float]]:
  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

    async def one_client(c: int) -> list[dict[str, float]]:
      return [await one_request(client, *jobs[c * per_client + k], new_tokens) for k in range(per_client)]

    results = await asyncio.gather(*(one_client(c) for c in range(clients)))
  return [r for rs in results for r in rs]


def concurrent_load(url: str, cases, clients: int, per_client: int, new_tokens: int) -> dict[str, Any]:
  """`clients` concurrent clients (coroutines on one event loop), each sending `per_client` requests in turn."""
  jobs = [cases[(c * per_client + k) % len(cases)] for c in range(clients) for k in range(per_client)]
  start = time.perf_counter()
  results = asyncio.run(_clients(url, jobs, clients, per_client, new_tokens))
  seconds = time.perf_counter() - start
  ttft = sorted(r["ttft"] for r in results)
  tokens = sum(r["tokens"] for r in results)
  return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": seconds,
          "tokens_per_s": tokens / seconds, "ttft_p50_s": statistics.median(ttft),
          "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
          "tpot_p50_s": statistics.median(r["tpot"] for r in results)}


def run(args: argparse.Namespace) -> None:
  env = environment()
  print(f"{env['date']}  {env['device']} x{env['device_count']} ({env['jax_backend']}), CPU {env['cpu']} "
        f"({env['cpu_cores']} cores); jax {env['jax']}, flax {env['flax']}", flush=True)
  levels = [int(c) for c in args.clients.split(",") if c]
  cases = workload(max(max(levels) * args.requests_per_client, 16))
  dtype = default_dtype() if args.dtype == "auto" else args.dtype
  with tempfile.TemporaryDirectory(prefix="flashvl_serve_bench_") as tmp:
    checkpoint = write_random_checkpoint(PRESETS_BY_SIZE[args.size][args.variant], pathlib.Path(tmp) / "hf")
    model = FlashVL.from_pretrained(str(checkpoint), dtype=dtype, max_length=args.max_seq_len)
    base = sequential(model, cases[:args.baseline_requests], args.new_tokens)
    del model
    print(f"sequential generate: {base['requests']} requests, {base['tokens_per_s']:.1f} tok/s", flush=True)
    server = ServerProcess(checkpoint, "--max-batch", str(args.max_batch), "--max-seq-len", str(args.max_seq_len),
                           "--dtype", dtype, "--decode-steps", str(args.decode_steps), timeout=1800)
    rows = []
    try:
      for clients in levels:
        row = concurrent_load(server.url, cases, clients, args.requests_per_client, args.new_tokens)
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        rows.append(row)
        print(f"{clients:3d} clients  {row['requests']:4d} requests  {row['tokens_per_s']:8.1f} tok/s  "
              f"{row['speedup']:5.2f}x sequential  TTFT p50 {row['ttft_p50_s'] * 1e3:7.1f} ms  "
              f"p99 {row['ttft_p99_s'] * 1e3:7.1f} ms  per token p50 {row['tpot_p50_s'] * 1e3:6.1f} ms", flush=True)
      compilations = server.metric("flashvl_compilations")
    finally:
      server.stop()
  print(f"server compilations (warm-up included): {compilations:.0f}")
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps(dict(environment=env, settings=settings, sequential=base, server=rows), indent=2))


def main(argv: Sequence[str] | None = None) -> int:
  parser = ArgumentParser(prog="python -m flashvl_jax.bench --serve", description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", choices=tuple(PRESETS_BY_SIZE), default="tiny", help="model presets (default tiny)")
  parser.add_argument("--variant", choices=("static", "dynamic", "iss"), default="static")
  parser.add_argument("--clients", default="1,4,16,64", help="concurrency levels")
  parser.add_argument("--requests-per-client", type=int, default=2)
  parser.add_argument("--baseline-requests", type=int, default=16, help="requests in the sequential baseline")
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--max-batch", type=int, default=16, help="the server's decode slots")
  parser.add_argument("--max-seq-len", type=int, default=1024)
  parser.add_argument("--decode-steps", type=int, default=4)
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
  parser.add_argument("--json", type=pathlib.Path, help="write the results here")
  add_debug_flag(parser)
  args = parser.parse_args(argv)
  return run_cli(lambda: run(args), debug=args.debug)
