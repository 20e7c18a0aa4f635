"""`python -m flashvl_jax.serve CKPT [--host 127.0.0.1] [--port 8000] [--max-batch N] [--max-seq-len L] ...`

Loads CKPT (anything `FlashVL.from_pretrained` loads), compiles every prompt bucket of the engine, then serves
the OpenAI Chat Completions API (docs/serving.md). SIGTERM or Ctrl-C stops accepting requests, lets running ones
finish for up to --shutdown-timeout seconds, cancels the rest and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import pathlib
import signal
import socket
import sys
import time
from typing import Sequence

from flashvl_jax.cli import ArgumentParser, add_debug_flag, run_cli
from flashvl_jax.config import ConfigError
from flashvl_jax.errors import MissingDependencyError


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=-1,tensor=1' -> {'data': 1, 'fsdp': -1, 'tensor': 1}."""
  try:
    return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not like data=1,fsdp=-1,tensor=1") from None


def build_parser() -> ArgumentParser:
  parser = ArgumentParser(prog="python -m flashvl_jax.serve", description=__doc__.split("\n\n")[1],
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("checkpoint", help="an Orbax checkpoint written by `convert`, or a Hugging Face directory")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--max-batch", type=int, default=8, help="decode slots: requests generated at once")
  parser.add_argument("--max-seq-len", type=int, default=2048, help="prompt + answer tokens per request")
  parser.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429")
  parser.add_argument("--decode-steps", type=int, default=4, help="tokens per slot per device call")
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                      help="compute dtype (auto: float32 on CPU, bfloat16 elsewhere)")
  parser.add_argument("--mesh", type=parse_mesh, help="device mesh, e.g. data=1,fsdp=-1,tensor=1 (default: one device)")
  parser.add_argument("--allowed-image-dir", type=pathlib.Path,
                      help="serve local image paths / file:// URLs under this folder (default: base64 data: URLs only)")
  parser.add_argument("--model-name", help="the model id in responses and /v1/models (default: the folder name)")
  parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                      help="seconds running requests may take to finish after SIGTERM")
  parser.add_argument("--compilation-cache", metavar="DIR", help="persistent compilation cache (faster restarts)")
  add_debug_flag(parser)
  return parser


def check_port_free(host: str, port: int) -> None:
  with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind((host, port))
    except OSError as e:
      reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e.strerror})"
      raise ConfigError(f"--host {host} --port {port}: the address {reason}; choose another --port") from None


def serve(args: argparse.Namespace) -> None:
  try:
    import uvicorn  # pylint: disable=import-outside-toplevel

    from flashvl_jax.serve.app import create_app  # pylint: disable=import-outside-toplevel
    from flashvl_jax.serve.service import ChatService  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise MissingDependencyError(f"the server needs FastAPI, uvicorn and prometheus-client ({e}): pip install "
                                 "'flashvl-jax[serve]'") from None
  from flashvl_jax.api import FlashVL, default_dtype  # pylint: disable=import-outside-toplevel
  from flashvl_jax.compilation_cache import enable_compilation_cache  # pylint: disable=import-outside-toplevel
  from flashvl_jax.engine import Engine  # pylint: disable=import-outside-toplevel
  from flashvl_jax.sharding import make_mesh  # pylint: disable=import-outside-toplevel

  for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-seq-len", args.max_seq_len, 2),
                           ("--max-queue", args.max_queue, 1), ("--decode-steps", args.decode_steps, 1)):
    if value < low:
      raise ConfigError(f"{flag} must be >= {low}, got {value}")
  if args.allowed_image_dir is not None and not args.allowed_image_dir.is_dir():
    raise ConfigError(f"--allowed-image-dir {args.allowed_image_dir} is not a directory")
  check_port_free(args.host, args.port)
  enable_compilation_cache(args.compilation_cache)
  mesh = make_mesh(args.mesh) if args.mesh else None
  model = FlashVL.from_pretrained(args.checkpoint, dtype=default_dtype() if args.dtype == "auto" else args.dtype,
                                  mesh=mesh, max_length=args.max_seq_len)
  engine = Engine(model.module, slots=args.max_batch, max_seq_len=args.max_seq_len, stop_ids=model.tokenizer.eos_ids,
                  mesh=mesh, decode_steps=args.decode_steps, max_queue=args.max_queue)
  start = time.perf_counter()
  print(f"warming up: {args.max_batch} slots x {args.max_seq_len} positions, prompt buckets "
        f"{engine.prompt_buckets()} ...", flush=True)
  compiled = engine.warmup()
  print(f"compiled {compiled} functions in {time.perf_counter() - start:.1f} s", flush=True)
  name = args.model_name or pathlib.Path(args.checkpoint).resolve().name
  service = ChatService(model, engine, model_name=name, allowed_image_dir=args.allowed_image_dir)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    engine.start()
    service.ready = True
    print(f"ready: serving {name} on http://{args.host}:{args.port}/v1", flush=True)
    yield
    service.ready = False
    engine.stop()
    print("stopped", flush=True)

  config = uvicorn.Config(create_app(service, lifespan), host=args.host, port=args.port, log_level="warning",
                          timeout_graceful_shutdown=args.shutdown_timeout)
  # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler it found: make that one a no-op,
  # so that a requested stop exits 0.
  signal.signal(signal.SIGTERM, lambda *_: None)
  uvicorn.Server(config).run()


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return run_cli(lambda: serve(args), debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
