"""The chat CLI: `FlashVL.chat` (like the reference's `model.chat`) from a shell.

  python -m flashvl_jax.chat CKPT --image cat.jpg "What animal is this?"    # one answer, streamed
  python -m flashvl_jax.chat CKPT --image cat.jpg                           # interactive

CKPT is anything `FlashVL.from_pretrained` loads (an Orbax checkpoint written by `convert`, or a Hugging Face
directory). Interactive mode reads one user turn per line from stdin and keeps the conversation; commands:
`/image PATH` (a new image and a new conversation; `/image none` for text only), `/reset` (forget the
conversation, keep the image), `/quit` (or end of input).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

from flashvl_jax.api import FlashVL, default_dtype
from flashvl_jax.cli import ArgumentParser, add_debug_flag, run_cli
from flashvl_jax.compilation_cache import enable_compilation_cache
from flashvl_jax.errors import UserError
from flashvl_jax.preprocess.image import load_image
from flashvl_jax.preprocess.processor import Messages
from flashvl_jax.sampling import InvalidRequestError, SamplingParams


def _answer(model: FlashVL, image, messages: Messages, out: TextIO, **kwargs) -> str:
  pieces = []
  for piece in model.chat(image, messages, stream=True, **kwargs):
    pieces.append(piece)
    out.write(piece)
    out.flush()
  out.write("\n")
  return "".join(pieces)


def interactive(model: FlashVL, image, lines: TextIO, out: TextIO, **kwargs) -> None:
  """The conversation loop of the CLI: one user turn per input line, commands as in the module docstring."""
  messages: list[dict[str, str]] = []
  prompt = "> " if lines.isatty() else ""
  out.write("Type a message; /image PATH (or none), /reset, /quit.\n")
  while True:
    out.write(prompt)
    out.flush()
    line = lines.readline()
    if not line or line.strip() == "/quit":
      return
    line = line.strip()
    if not line:
      continue
    if line == "/reset":
      messages = []
      out.write("(conversation cleared)\n")
    elif line.startswith("/image"):
      path = line[len("/image"):].strip()
      try:
        image = None if path.lower() in ("", "none") else load_image(path)
      except UserError as e:
        out.write(f"error: {e}\n")
        continue
      messages = []
      out.write(f"(new conversation {'without an image' if image is None else 'about ' + path})\n")
    else:
      turn = messages + [{"role": "user", "content": line}]
      try:
        answer = _answer(model, image, turn, out, **kwargs)
      except UserError as e:  # e.g. the conversation outgrew the context: say so and keep the session
        out.write(f"error: {e}\n")
        continue
      messages = turn + [{"role": "assistant", "content": answer}]


def main(argv: Sequence[str] | None = None) -> int:
  parser = ArgumentParser(prog="python -m flashvl_jax.chat", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("checkpoint", help="an Orbax checkpoint written by `convert`, or a Hugging Face directory")
  parser.add_argument("question", nargs="?", help="answer this one question and exit (else: interactive)")
  parser.add_argument("--image", help="image file (default: text only)")
  parser.add_argument("--max-new-tokens", type=int, default=256)
  parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max-length", type=int, default=2048,
                      help="prompt tokens (image tokens included) + new tokens allowed per conversation")
  parser.add_argument("--truncate", action="store_true",
                      help="drop the oldest text tokens of a conversation that outgrows --max-length (else: error)")
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                      help="compute dtype (auto: float32 on CPU, bfloat16 elsewhere)")
  parser.add_argument("--compilation-cache", metavar="DIR",
                      help="persistent compilation cache: a second start skips XLA (default $JAX_COMPILATION_CACHE_DIR)")
  add_debug_flag(parser)
  args = parser.parse_intermixed_args(argv)
  return run_cli(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> None:
  image = None if args.image is None else load_image(args.image)
  # Checked before the model loads (which can take a minute).
  SamplingParams(args.do_sample, args.temperature, args.top_k, args.top_p)
  if args.max_new_tokens < 1:
    raise InvalidRequestError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  enable_compilation_cache(args.compilation_cache)
  if args.max_length <= args.max_new_tokens:
    raise InvalidRequestError(f"--max-length {args.max_length} leaves no room for a prompt next to "
                              f"--max-new-tokens {args.max_new_tokens}")
  # The prompt may use what the answer does not: its limit is max_length - max_new_tokens.
  model = FlashVL.from_pretrained(args.checkpoint, dtype=default_dtype() if args.dtype == "auto" else args.dtype,
                                  max_length=args.max_length - args.max_new_tokens, truncate=args.truncate)
  kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_length=args.max_length)
  if args.question is not None:
    _answer(model, image, [{"role": "user", "content": args.question}], sys.stdout, **kwargs)
  else:
    interactive(model, image, sys.stdin, sys.stdout, **kwargs)


if __name__ == "__main__":
  sys.exit(main())
