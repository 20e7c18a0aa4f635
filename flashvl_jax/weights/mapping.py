"""Key-mapping tables between Hugging Face safetensors and our NNX parameter paths.

A table is a list of `Rule`s. Each rule pairs an HF key template with one or more of our path templates
(`{i}` stands for a layer index) and a `Transform` that turns the HF tensor into ours and back. Because
both sides are templates, the same table serves import (HF -> ours) and export (ours -> HF). Our layers are
stacked: `{i}` in our template selects slice i of one [L, ...] leaf, so L HF tensors make one leaf.

`plan_import` checks a whole checkpoint *before* any tensor is read, from the shapes alone, and raises
one `WeightMappingError` listing every unmapped key, every missing parameter and every shape mismatch.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from flashvl_jax.errors import UserError


LAYER = "i"  # the template field that indexes stacked layers


class WeightMappingError(UserError, ValueError):
  """A checkpoint does not match the model: the message lists every offending key."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """HF tensor -> our tensors (`to_ours`) and back (`to_hf`). Both must be exact (no arithmetic)."""

  name: str
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]


IDENTITY = Transform("identity", lambda w: (w,), lambda w: w)
LINEAR = Transform("linear W.T", lambda w: (w.T,), lambda k: k.T)  # torch [out, in] -> flax [in, out]
CONV = Transform("conv OIHW->HWIO", lambda w: (w.transpose(2, 3, 1, 0),), lambda k: k.transpose(3, 2, 0, 1))
SQUEEZE0 = Transform("squeeze(0)", lambda w: (w[0],), lambda w: w[None])


def split_linear(n: int) -> Transform:
  """A fused [n*out, in] torch weight (e.g. qkv) -> n flax kernels [in, out]."""
  return Transform(f"split rows in {n}, W.T", lambda w: tuple(p.T for p in np.split(w, n, axis=0)),
                   lambda *ks: np.concatenate([k.T for k in ks], axis=0))


def split_rows(n: int) -> Transform:
  """A fused [n*out] bias -> n biases."""
  return Transform(f"split in {n}", lambda b: tuple(np.split(b, n, axis=0)), lambda *bs: np.concatenate(bs, axis=0))


def _template_regex(template: str) -> re.Pattern:
  parts = re.split(r"\{(\w+)\}", template)
  out = []
  for i, part in enumerate(parts):
    out.append(re.escape(part) if i % 2 == 0 else f"(?P<{part}>\\d+)")
  return re.compile("".join(out) + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
  """HF key template <-> our path template(s). `ours=None` marks HF keys we knowingly drop."""

  hf: str
  ours: str | tuple[str, ...] | None
  transform: Transform = IDENTITY

  @property
  def our_templates(self) -> tuple[str, ...]:
    if self.ours is None:
      return ()
    return (self.ours,) if isinstance(self.ours, str) else tuple(self.ours)


def linear_rules(hf: str, ours: str, bias: bool = True) -> list[Rule]:
  """torch Linear `hf.{weight,bias}` <-> nnx.Linear `ours.{kernel,bias}`."""
  rules = [Rule(f"{hf}.weight", f"{ours}.kernel", LINEAR)]
  return rules + [Rule(f"{hf}.bias", f"{ours}.bias")] if bias else rules


def norm_rules(hf: str, ours: str, bias: bool = True) -> list[Rule]:
  """torch LayerNorm (bias=True) or RMSNorm (bias=False) `hf.weight` <-> our `ours.scale` (+ `bias`)."""
  rules = [Rule(f"{hf}.weight", f"{ours}.scale")]
  return rules + [Rule(f"{hf}.bias", f"{ours}.bias")] if bias else rules


@dataclasses.dataclass(frozen=True)
class Step:
  """One HF tensor and the parameters it becomes: whole leaves, or slice `index` of stacked leaves."""

  hf_key: str
  our_paths: tuple[str, ...]
  transform: Transform
  index: int | None = None  # the layer index into stacked leaves; None: the leaves are not stacked


@dataclasses.dataclass(frozen=True)
class ExportStep:
  """One HF tensor made from our leaves (slice `index` of them when they are stacked)."""

  hf_key: str
  rule: Rule
  our_paths: tuple[str, ...]
  index: int | None = None


def _leaf_template(template: str) -> str:
  """Our per-layer template -> the stacked leaf's path template ('model.layers.{i}.x' -> 'model.layers.x')."""
  return template.replace(f".{{{LAYER}}}", "")


class Table:
  """An ordered list of rules; the first rule whose template matches a key wins.

  `{i}` in our templates is a layer index into stacked parameters: `model.layers.{i}.mlp.up_proj.kernel` names
  slice i of the leaf `model.layers.mlp.up_proj.kernel` [L, ...]. Every other `{name}` is part of the path.
  """

  def __init__(self, rules: Sequence[Rule], name: str = ""):
    self.rules = tuple(rules)
    self.name = name
    self._hf = [(_template_regex(r.hf), r) for r in self.rules]
    self._ours = [[(_template_regex(_leaf_template(t)), r) for t in r.our_templates] for r in self.rules]
    self._stacked = [(_template_regex(_leaf_template(t)), t) for r in self.rules for t in r.our_templates
                     if f"{{{LAYER}}}" in t]

  def with_prefix(self, hf_prefix: str, our_prefix: str, name: str | None = None) -> "Table":
    """The same table nested under `hf_prefix` / `our_prefix` (e.g. 'vit.' / 'vit.')."""
    rules = []
    for r in self.rules:
      ours = None if r.ours is None else tuple(our_prefix + t for t in r.our_templates)
      rules.append(Rule(hf_prefix + r.hf, ours, r.transform))
    return Table(rules, name or self.name)

  def __add__(self, other: "Table") -> "Table":
    return Table(self.rules + other.rules, f"{self.name}+{other.name}")

  def match_hf(self, key: str) -> tuple[Rule, dict[str, str]] | None:
    for regex, rule in self._hf:
      m = regex.match(key)
      if m:
        return rule, m.groupdict()
    return None

  def layer_name(self, path: str, index: int) -> str | None:
    """The per-layer name of slice `index` of our stacked leaf `path` ('model.layers.3.mlp.up_proj.kernel'), or
    None when `path` is not stacked (no template with `{i}` names it)."""
    for regex, template in self._stacked:
      m = regex.match(path)
      if m:
        return template.format(**m.groupdict(), **{LAYER: index})
    return None

  def plan_import(self, hf_shapes: Mapping[str, tuple[int, ...]], our_shapes: Mapping[str, tuple[int, ...]],
                  what: str = "checkpoint") -> list[Step]:
    """Checks that the HF tensors map exactly onto our parameters and returns the steps to convert them.

    hf_shapes: HF key -> shape (from the safetensors header). our_shapes: our leaf path -> shape (stacked leaves
    [L, ...]: every layer 0..L-1 must be provided once). Steps come grouped by leaf, layers in order.
    """
    steps, unexpected, mismatched, produced = [], [], [], {}
    for key in sorted(hf_shapes):
      found = self.match_hf(key)
      if found is None:
        unexpected.append(key)
        continue
      rule, groups = found
      if rule.ours is None:
        continue
      stacked = LAYER in groups and any(f"{{{LAYER}}}" in t for t in rule.our_templates)
      index = int(groups[LAYER]) if stacked else None
      paths = tuple(_leaf_template(t).format(**groups) if stacked else t.format(**groups) for t in rule.our_templates)
      shapes = [tuple(a.shape) for a in rule.transform.to_ours(_shape_only(hf_shapes[key]))]
      names = tuple(t.format(**groups) for t in rule.our_templates)  # per layer: 'model.layers.3.mlp...'
      for path, slot, shape in zip(paths, names, shapes):
        if slot in produced:
          mismatched.append(f"{slot} is produced by both {produced[slot]} and {key}")
        produced[slot] = key
        if path not in our_shapes:
          unexpected.append(f"{key} (maps to {slot}, which the model does not have)")
          continue
        expected = tuple(our_shapes[path])
        if index is not None:
          if not expected or index >= expected[0]:
            unexpected.append(f"{key} (layer {index}, but the model's {path} holds {expected[0] if expected else 0} "
                              "layers)")
            continue
          expected = expected[1:]
        if expected != shape:
          mismatched.append(f"{key} {tuple(hf_shapes[key])} -> {slot}: checkpoint gives {shape}, "
                            f"model expects {expected}")
      steps.append(Step(key, paths, rule.transform, index))
    missing = []
    for path in sorted(our_shapes):
      if self.layer_name(path, 0) is None:
        if path not in produced:
          missing.append(path)
        continue
      missing += [f"{name} (layer {i} of {path})" for i in range(our_shapes[path][0])
                  if (name := self.layer_name(path, i)) not in produced]
    if unexpected or missing or mismatched:
      lines = [f"{what} does not match the model ({self.name or 'table'}):"]
      for title, items in (("unexpected keys (no rule maps them)", unexpected),
                           ("missing parameters (no checkpoint key provides them)", missing),
                           ("shape mismatches", mismatched)):
        if items:
          lines.append(f"  {len(items)} {title}:")
          lines.extend(f"    {x}" for x in items)
      raise WeightMappingError("\n".join(lines))
    return sorted(steps, key=lambda s: (s.our_paths, -1 if s.index is None else s.index))

  def plan_export(self, our_shapes: Mapping[str, tuple[int, ...]]) -> list[ExportStep]:
    """The HF tensors our parameters make, grouped by leaf (a stacked leaf gives one per layer, in order); every
    parameter must be used."""
    out, used, orphan = [], set(), []
    for path in sorted(our_shapes):
      if path in used:
        continue
      for rule_index, rule in enumerate(self.rules):
        hit = None
        for (regex, r), template in zip(self._ours[rule_index], rule.our_templates):
          m = regex.match(path)
          if m:
            hit, stacked = m.groupdict(), f"{{{LAYER}}}" in template
            break
        if hit is None:
          continue
        paths = tuple(_leaf_template(t).format(**hit) for t in rule.our_templates)
        absent = [p for p in paths if p not in our_shapes]
        if absent:
          raise WeightMappingError(f"export: {rule.hf} needs {absent}, which the model does not have")
        used.update(paths)
        if stacked:
          out += [ExportStep(rule.hf.format(**hit, **{LAYER: i}), rule, paths, i) for i in range(our_shapes[path][0])]
        else:
          out.append(ExportStep(rule.hf.format(**hit), rule, paths))
        break
      else:
        orphan.append(path)
    if orphan:
      raise WeightMappingError("export: no rule maps these parameters to an HF key:\n" +
                               "\n".join(f"  {p}" for p in orphan))
    return out


def _shape_only(shape: Sequence[int]) -> np.ndarray:
  """A zero-byte array of `shape`, so transforms can be applied to shapes alone."""
  return np.broadcast_to(np.zeros((), np.int8), tuple(shape))


def run_import(steps: Iterable[Step], get: Callable[[str], np.ndarray],
               dtypes: Mapping[str, Any] | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Streams (our_path, array) pairs, reading one HF tensor at a time with `get(hf_key)`.

  A stacked leaf is assembled from its layers' tensors (consecutive in `plan_import`'s order) and yielded whole,
  so at most one group of stacked leaves is in memory; `dtypes` (path -> dtype) allocates them in the dtype they
  will be stored in instead of the source's.
  """
  for paths, group in itertools.groupby(steps, key=lambda s: (s.our_paths, s.index is None)):
    paths, whole = paths
    if whole:
      for step in group:
        for path, arr in zip(step.our_paths, step.transform.to_ours(get(step.hf_key))):
          yield path, np.ascontiguousarray(arr)
      continue
    group = list(group)
    stacks = None
    for step in group:
      parts = step.transform.to_ours(get(step.hf_key))
      if stacks is None:
        stacks = [np.empty((len(group), *p.shape), (dtypes or {}).get(path, p.dtype)) for path, p in zip(paths, parts)]
      for stack, part in zip(stacks, parts):
        stack[step.index] = part
    yield from zip(paths, stacks)


def run_export(plan: Iterable[ExportStep], get: Callable[[str], np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
  """Streams (hf_key, array) pairs, reading our leaves with `get(path)` (sliced by layer when stacked)."""
  for step in plan:
    leaves = [get(p) for p in step.our_paths]
    if step.index is not None:
      leaves = [leaf[step.index] for leaf in leaves]
    yield step.hf_key, np.ascontiguousarray(step.rule.transform.to_hf(*leaves))
