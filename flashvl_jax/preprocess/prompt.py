"""The Flash-VL chat prompt: Qwen chat template, image-token expansion, and the loss mask.

Rendered conversation (FLASHVL_REFERENCE.md), one image at most, in the first user turn:

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
inference; everything else is tokenized as one text between images and answers. The loss mask is 1 exactly on
answer tokens including their `<|im_end|>`, and 0 on the system and user turns, the role headers, the newline
after each `<|im_end|>`, image tokens and slice markers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

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


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
  """(role, content) pairs from `{"role", "content"}` or LLaVA `{"from": "human"|"gpt"|"system", "value"}`."""
  pairs = []
  for i, message in enumerate(messages):
    if "role" in message:
      role, content = message["role"], message.get("content")
    elif "from" in message:
      role, content = _LLAVA_ROLES.get(message["from"], message["from"]), message.get("value")
    else:
      raise ValueError(f"message {i} has neither 'role'/'content' nor LLaVA 'from'/'value' keys: {dict(message)}")
    if role not in _ROLES:
      raise ValueError(f"message {i} has role {role!r}; use one of {_ROLES} (LLaVA: human, gpt, system)")
    if not isinstance(content, str):
      raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
    pairs.append((role, content))
  return pairs


def _check_turn_order(pairs: list[tuple[str, str]]) -> None:
  turns = [(i, role) for i, (role, _) in enumerate(pairs) if role != "system"]
  for k, (i, role) in enumerate(turns):
    expected = "user" if k % 2 == 0 else "assistant"
    if role != expected:
      raise ValueError(f"message {i} is from {role!r} but {expected!r} was expected: turns must alternate "
                       "user, assistant, user, ... (system messages aside)")


def _place_image(pairs: list[tuple[str, str]], has_image: bool) -> list[tuple[str, str]]:
  """Puts `<image>\\n` before the first user text unless the conversation already holds the placeholder."""
  where = [i for i, (_, content) in enumerate(pairs) for _ in range(content.count(IMAGE_PLACEHOLDER))]
  if not has_image:
    if where:
      raise ValueError(f"message {where[0]} contains {IMAGE_PLACEHOLDER!r} but no image was given")
    return pairs
  if len(where) > 1:
    raise ValueError(f"found {len(where)} {IMAGE_PLACEHOLDER!r} placeholders (messages {where}); Flash-VL takes "
                     "one image per conversation")
  if where:
    if pairs[where[0]][0] != "user":
      raise ValueError(f"the {IMAGE_PLACEHOLDER!r} placeholder is in a {pairs[where[0]][0]!r} message; it must "
                       "be in a user message")
    return pairs
  first_user = next((i for i, (role, _) in enumerate(pairs) if role == "user"), None)
  if first_user is None:
    raise ValueError("an image was given but the conversation has no user message to attach it to")
  pairs = list(pairs)
  pairs[first_user] = ("user", f"{IMAGE_PLACEHOLDER}\n{pairs[first_user][1]}")
  return pairs


def conversation_pieces(messages: Sequence[Mapping[str, Any]], *, has_image: bool,
                        add_generation_prompt: bool = False,
                        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[tuple[str, bool]]:
  """The rendered conversation as (text, is_answer) pieces; the image is the literal `<image>`.

  A leading system message replaces `system_prompt`; `system_prompt=None` renders no system turn then.
  """
  pairs = normalize_messages(messages)
  _check_turn_order(pairs)
  pairs = _place_image(pairs, has_image)
  if system_prompt is not None and (not pairs or pairs[0][0] != "system"):
    pairs = [("system", system_prompt)] + pairs
  pieces = []
  for role, content in pairs:
    if role == "assistant":
      pieces += [(f"{IM_START}assistant\n", False), (f"{content}{IM_END}", True), ("\n", False)]
    else:
      pieces.append((f"{IM_START}{role}\n{content}{IM_END}\n", False))
  if add_generation_prompt:
    pieces.append((f"{IM_START}assistant\n", False))
  return pieces


def render_conversation(messages: Sequence[Mapping[str, Any]], *, has_image: bool,
                        add_generation_prompt: bool = False,
                        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
  """The prompt text, image shown as `<image>` (what a Qwen2.5-style chat template renders)."""
  return "".join(text for text, _ in conversation_pieces(
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
                        image_pad_token_id: int = IMAGE_PAD_TOKEN_ID) -> dict[str, list[int]]:
  """Token ids and loss mask of a conversation; its image is given by `plan` or `num_image_tokens`.

  With `plan`, each tile's tokens form one slice (`plan.tile_token_counts`); `num_image_tokens` is one slice.
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
  runs: list[tuple[str, bool]] = []  # adjacent pieces of the same kind, tokenized together
  for text, is_answer in pieces:
    if runs and runs[-1][1] == is_answer:
      runs[-1] = (runs[-1][0] + text, is_answer)
    else:
      runs.append((text, is_answer))
  input_ids, loss_mask = [], []
  for text, is_answer in runs:
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
      if k:
        input_ids += image_ids
        loss_mask += [0] * len(image_ids)
      chunk_ids = tokenizer.encode(chunk) if chunk else []
      input_ids += chunk_ids
      loss_mask += [int(is_answer)] * len(chunk_ids)
  return {"input_ids": input_ids, "loss_mask": loss_mask}
