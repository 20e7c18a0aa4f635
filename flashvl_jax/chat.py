"""Chat with a Flash-VL model: `chat(model, image, messages)` like the reference's `model.chat`, and a CLI.

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
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, TextIO

import jax

from flashvl_jax import sampling
from flashvl_jax.preprocess.image import ImageError, ImageSource, load_image
from flashvl_jax.preprocess.processor import PromptTooLongError

if TYPE_CHECKING:
  from flashvl_jax.api import FlashVL

Messages = Sequence[Mapping[str, Any]]


def chat(model: FlashVL, image: ImageSource | None, messages: Messages | str, *, max_new_tokens: int = 256,
         do_sample: bool = False, stream: bool = False, stop_ids: Sequence[int] | None = None,
         **sampling_kwargs) -> str | Iterator[str]:
  """The assistant's answer to `messages` about `image` (a PIL image, a path, or None for text only).

  messages: role/content dicts, user and assistant alternating, ending with the user turn to answer (a string
    is one user turn); the image goes with the first user turn. The prompt is the processor's chat template
    with the generation prompt. Greedy by default; `do_sample=True` with `temperature`, `top_k`, `top_p`,
    `seed` (see `sampling.generate`). Generation stops at the tokenizer's end-of-turn ids (or `stop_ids`),
    which are not part of the answer; special tokens are skipped as the reference decodes.
  stream: return an iterator of text pieces (decoded a few tokens at a time) that join to the answer.
  """
  if isinstance(messages, str):
    messages = [{"role": "user", "content": messages}]
  stop_ids = tuple(model.tokenizer.eos_ids if stop_ids is None else stop_ids)
  batch = model.processor([image], [messages], add_generation_prompt=True)
  kwargs = dict(batch, max_new_tokens=max_new_tokens, do_sample=do_sample, stop_ids=stop_ids, **sampling_kwargs)
  if stream:
    return _stream_text(model, kwargs, stop_ids)
  ids = sampling.generate(model, **kwargs)[0]
  return model.tokenizer.decode([i for i in ids if i not in stop_ids])


def _stream_text(model: FlashVL, kwargs: dict[str, Any], stop_ids: tuple[int, ...]) -> Iterator[str]:
  decoder = model.tokenizer.stream_decoder()
  for chunk in sampling.stream(model, **kwargs):
    piece = decoder.push([i for i in chunk[0] if i not in stop_ids])
    if piece:
      yield piece
  tail = decoder.flush()
  if tail:
    yield tail


def default_dtype() -> str:
  """bfloat16 on accelerators; float32 on CPU, where bf16 compute is several times slower."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _answer(model: FlashVL, image, messages: Messages, out: TextIO, **kwargs) -> str:
  pieces = []
  for piece in chat(model, image, messages, stream=True, **kwargs):
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
      except ImageError as e:
        out.write(f"error: {e}\n")
        continue
      messages = []
      out.write(f"(new conversation {'without an image' if image is None else 'about ' + path})\n")
    else:
      turn = messages + [{"role": "user", "content": line}]
      try:
        answer = _answer(model, image, turn, out, **kwargs)
      except PromptTooLongError as e:
        out.write(f"error: {e}\n")
        continue
      messages = turn + [{"role": "assistant", "content": answer}]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m flashvl_jax.chat", description=__doc__.split("\n\n")[0])
  parser.add_argument("checkpoint", help="an Orbax checkpoint written by `convert`, or a Hugging Face directory")
  parser.add_argument("question", nargs="?", help="answer this one question and exit (else: interactive)")
  parser.add_argument("--image", help="image file (default: text only)")
  parser.add_argument("--max-new-tokens", type=int, default=256)
  parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                      help="compute dtype (auto: float32 on CPU, bfloat16 elsewhere)")
  parser.add_argument("--compilation-cache", metavar="DIR",
                      help="persistent compilation cache: a second start skips XLA (default $JAX_COMPILATION_CACHE_DIR)")
  args = parser.parse_intermixed_args(argv)

  try:
    image = None if args.image is None else load_image(args.image)
  except ImageError as e:
    parser.error(str(e))
  from flashvl_jax.api import FlashVL  # pylint: disable=import-outside-toplevel
  from flashvl_jax.compilation_cache import enable_compilation_cache  # pylint: disable=import-outside-toplevel

  enable_compilation_cache(args.compilation_cache)

  model = FlashVL.from_pretrained(args.checkpoint, dtype=default_dtype() if args.dtype == "auto" else args.dtype)
  kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  if args.question is not None:
    _answer(model, image, [{"role": "user", "content": args.question}], sys.stdout, **kwargs)
  else:
    interactive(model, image, sys.stdin, sys.stdout, **kwargs)
  return 0


if __name__ == "__main__":
  sys.exit(main())
