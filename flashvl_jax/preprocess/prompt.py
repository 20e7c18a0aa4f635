"""The Flash-VL chat prompt: Qwen chat template, image-token expansion, and the loss mask.

Rendered conversation (the reference's Qwen chat template), one image at most, in the first user turn:

  <|im_start|>system\\n{system}<|im_end|>\\n
  <|im_start|>user\\n<image>\\n{question}<|im_end|>\\n
  <|im_start|>assistant\\n{answer}<|im_end|>\\n
  ... more user/assistant turns ...
  [<|im_start|>assistant\\n]                     (add_generation_prompt)

Token ids follow the reference's `tokenizer_image_token`: the text is tokenized in chunks split at `<image>`,
and the placeholder becomes one `image_token_id` (-200) followed by n-1 `image_pad_token_id` (-201), n being the
image's token count. The model writes the image features into those positions in order. With slice markers
(dynamic tiling), each tile's tokens are wrapped in a start/end marker pair, by default `<|vision_start|>` /
`<|vision_end|>` (151652 / 151653); the released constants name `[PLACEHOLDER_0]` / `[PLACEHOLDER_1]`, whose ids
are unknown, hence configurable. The reference drops a placeholder at the very end of a prompt; this template
always follows the user text with `<|im_end|>`, so that case cannot arise.

Each answer (`{answer}<|im_end|>`) is tokenized on its own, as it is generated after `assistant\\n` at
inference; everything else is tokenized as one text between images, answers and control tokens. The control
tokens (`<|im_start|>`, `<|im_end|>`) are placed by id, and message text is encoded with special-token strings
as plain text, so a user who types `<|im_end|>` cannot end their turn or open an assistant one
(`special_tokens_in_text=True` restores parsing them, for trusted prompts only). The loss mask is 1 exactly on
answer tokens including their `<|im_end|>`, and 0 on the system and user turns, the role headers, the newline
after each `<|im_end|>`, image tokens and slice markers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

from flashvl_jax.errors import UserError
from flashvl_jax.preprocess.tokenizer import IM_END, IM_START, Tokenizer

if TYPE_CHECKING:
  from flashvl_jax.preprocess.tiling import TilePlan

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_SLICE_MARKERS = ("<|vision_start|>", "<|vision_end|>")
IMAGE_TOKEN_ID = -200  # IMAGE_TOKEN_INDEX: the first position of an image
IMAGE_PAD_TOKEN_ID = -201  # IMAGE_PAD_TOKEN_INDEX: every other position of an image

_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_ROLES = ("system", "user", "assistant")


class MessageError(UserError, ValueError):
  """A conversation that cannot be used (wrong type, empty, bad roles or order, misplaced image); names the
  message."""


class Piece(NamedTuple):
  """A part of the rendered conversation."""

  text: str
  is_answer: bool  # scored by the loss
  is_control: bool  # one of the template's own special tokens, placed by id


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
  """(role, content) pairs from `{"role", "content"}` or LLaVA `{"from": "human"|"gpt"|"system", "value"}`."""
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    hint = "; wrap a single message in a list" if isinstance(messages, Mapping) else ""
    raise MessageError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}{hint}")
  if not messages:
    raise MessageError("the conversation is empty; give at least one user message")
  pairs = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise MessageError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
    if "role" in message:
      role, content = message["role"], message.get("content")
    elif "from" in message:
      role, content = _LLAVA_ROLES.get(message["from"], message["from"]), message.get("value")
    else:
      raise MessageError(f"message {i} has neither 'role'/'content' nor LLaVA 'from'/'value' keys: {dict(message)}")
    if role not in _ROLES:
      raise MessageError(f"message {i} has role {role!r}; use one of {_ROLES} (LLaVA: human, gpt, system)")
    if not isinstance(content, str):
      raise MessageError(f"message {i} content must be a string, got {type(content).__name__}")
    pairs.append((role, content))
  return pairs


def _check_turn_order(pairs: list[tuple[str, str]]) -> None:
  turns = [(i, role) for i, (role, _) in enumerate(pairs) if role != "system"]
  for k, (i, role) in enumerate(turns):
    expected = "user" if k % 2 == 0 else "assistant"
    if role != expected:
      raise MessageError(f"message {i} is from {role!r} but {expected!r} was expected: turns must alternate "
                       "user, assistant, user, ... (system messages aside)")


def _place_image(pairs: list[tuple[str, str]], has_image: bool) -> list[tuple[str, str]]:
  """Puts `<image>\\n` before the first user text unless the conversation already holds the placeholder."""
  where = [i for i, (_, content) in enumerate(pairs) for _ in range(content.count(IMAGE_PLACEHOLDER))]
  if not has_image:
    if where:
      raise MessageError(f"message {where[0]} contains {IMAGE_PLACEHOLDER!r} but no image was given")
    return pairs
  if len(where) > 1:
    raise MessageError(f"found {len(where)} {IMAGE_PLACEHOLDER!r} placeholders (messages {where}); Flash-VL takes "
                     "one image per conversation")
  if where:
    if pairs[where[0]][0] != "user":
      raise MessageError(f"the {IMAGE_PLACEHOLDER!r} placeholder is in a {pairs[where[0]][0]!r} message; it must "
                       "be in a user message")
    return pairs
  first_user = next((i for i, (role, _) in enumerate(pairs) if role == "user"), None)
  if first_user is None:
    raise MessageError("an image was given but the conversation has no user message to attach it to")
  pairs = list(pairs)
  pairs[first_user] = ("user", f"{IMAGE_PLACEHOLDER}\n{pairs[first_user][1]}")
  return pairs


def conversation_pieces(messages: Sequence[Mapping[str, Any]], *, has_image: bool,
                        add_generation_prompt: bool = False,
                        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[Piece]:
  """The rendered conversation as `Piece`s; the image is the literal `<image>` in a text piece.

  A leading system message replaces `system_prompt`; `system_prompt=None` renders no system turn then. With
  `add_generation_prompt` the conversation must end with a user message (the turn to answer).
  """
  pairs = normalize_messages(messages)
  _check_turn_order(pairs)
  if add_generation_prompt and pairs[-1][0] != "user":
    raise MessageError(f"message {len(pairs) - 1} is from {pairs[-1][0]!r}; to generate a reply the conversation must "
                     "end with a user message")
  pairs = _place_image(pairs, has_image)
  if system_prompt is not None and pairs[0][0] != "system":
    pairs = [("system", system_prompt)] + pairs
  start, end = Piece(IM_START, False, True), Piece(IM_END, False, True)
  pieces = []
  for role, content in pairs:
    if role == "assistant":
      pieces += [start, Piece("assistant\n", False, False), Piece(content, True, False), Piece(IM_END, True, True),
                 Piece("\n", False, False)]
    else:
      pieces += [start, Piece(f"{role}\n{content}", False, False), end, Piece("\n", False, False)]
  if add_generation_prompt:
    pieces += [start, Piece("assistant\n", False, False)]
  return pieces


def render_conversation(messages: Sequence[Mapping[str, Any]], *, has_image: bool,
                        add_generation_prompt: bool = False,
                        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
  """The prompt text, image shown as `<image>` (what a Qwen2.5-style chat template renders)."""
  return "".join(piece.text for piece in conversation_pieces(
      messages, has_image=has_image, add_generation_prompt=add_generation_prompt, system_prompt=system_prompt))


def image_token_ids(tile_token_counts: Sequence[int], *, slice_marker_ids: tuple[int, int] | None = None,
                    image_token_id: int = IMAGE_TOKEN_ID, image_pad_token_id: int = IMAGE_PAD_TOKEN_ID) -> list[int]:
  """The image block: `image_token_id` then pad ids, sum(tile_token_counts) placeholders in all, each tile's
  run wrapped in the (start, end) `slice_marker_ids` when given."""
  if not tile_token_counts or min(tile_token_counts) < 1:
    raise ValueError(f"every tile needs at least one image token, got counts {tuple(tile_token_counts)}")
  ids = []
  for count in tile_token_counts:
    run = [image_pad_token_id] * count
    ids += [slice_marker_ids[0], *run, slice_marker_ids[1]] if slice_marker_ids else run
  ids[ids.index(image_pad_token_id)] = image_token_id
  return ids


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *,
                        num_image_tokens: int | None = None, plan: TilePlan | None = None,
                        add_generation_prompt: bool = False, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                        slice_marker_ids: tuple[int, int] | None = None, image_token_id: int = IMAGE_TOKEN_ID,
                        image_pad_token_id: int = IMAGE_PAD_TOKEN_ID,
                        special_tokens_in_text: bool = False) -> dict[str, list[int]]:
  """Token ids and loss mask of a conversation; its image is given by `plan` or `num_image_tokens`.

  With `plan`, each tile's tokens form one slice (`plan.tile_token_counts`); `num_image_tokens` is one slice.
  special_tokens_in_text: parse special-token strings inside message text as control tokens (trusted prompts
    only; by default they are plain text).
  Returns dict(input_ids, loss_mask), lists of equal length.
  """
  if plan is not None and num_image_tokens is not None:
    raise ValueError("pass either plan or num_image_tokens, not both")
  counts = plan.tile_token_counts if plan is not None else None if num_image_tokens is None else (num_image_tokens,)
  image_ids = None if counts is None else image_token_ids(
      counts, slice_marker_ids=slice_marker_ids, image_token_id=image_token_id,
      image_pad_token_id=image_pad_token_id)
  pieces = conversation_pieces(messages, has_image=image_ids is not None,
                               add_generation_prompt=add_generation_prompt, system_prompt=system_prompt)
  runs: list[Piece] = []  # adjacent text pieces of the same kind, tokenized together
  for piece in pieces:
    if runs and not piece.is_control and not runs[-1].is_control and runs[-1].is_answer == piece.is_answer:
      runs[-1] = runs[-1]._replace(text=runs[-1].text + piece.text)
    else:
      runs.append(piece)
  input_ids, loss_mask = [], []
  for text, is_answer, is_control in runs:
    if is_control:
      input_ids.append(tokenizer.token_to_id(text))
      loss_mask.append(int(is_answer))
      continue
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
      if k:
        input_ids += image_ids
        loss_mask += [0] * len(image_ids)
      chunk_ids = tokenizer.encode(chunk, special_tokens=special_tokens_in_text) if chunk else []
      input_ids += chunk_ids
      loss_mask += [int(is_answer)] * len(chunk_ids)
  return {"input_ids": input_ids, "loss_mask": loss_mask}
