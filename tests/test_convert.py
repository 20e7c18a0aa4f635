"""`python -m convert` on tiny random checkpoints: hf -> Orbax (components in every layout, released Flash-VL, a
sharded set, bf16), export back (bit-exact round trips), inspect, assemble, verify, and the errors.

Outputs are compared with the PyTorch models that wrote the checkpoints (fp32, max abs <= 1e-4).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert.__main__ import main
from flashvl_jax import checkpoint
from flashvl_jax.testing import tiny_vision
from flashvl_jax.testing.tiny_qwen2 import build_tiny_qwen2
from flashvl_jax.testing.torch_flashvl import build_tiny_flashvl, load_released_layout, save_released_layout
from flashvl_jax.weights.hf_io import INDEX_FILE, SafetensorsReader, param_arrays

TOL = 1e-4
COMPONENTS = ("qwen2_tied", "qwen2_untied", "siglip", "siglip_full", "aimv2", "aimv2_apple")
FLASHVL = ("flashvl", "flashvl_apple", "flashvl_sharded")


def run_cli(*args: str) -> int:
  return main([*map(str, args), *(["--no-progress"] if args[0] in ("hf", "export", "assemble") else [])])


def released_with_apple_vit(ref, aimv2_model, out):
  """`ref` in the released layout, with `vit.*` in Apple's AIMv2 layout (as FlashVL-2B-Dynamic ships it)."""
  save_released_layout(ref, out, image_token_num=8)
  apple = out / "apple_vit"
  tiny_vision.write_apple_layout(aimv2_model, apple)
  tensors = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if not k.startswith("vit.")}
  tensors.update({f"vit.{k}": v for k, v in load_file(str(apple / "model.safetensors")).items()})
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  cfg = json.loads((out / "config.json").read_text())
  cfg["vision_config"] = {**json.loads((apple / "config.json").read_text()),
                          "proj_output_dim": cfg["vision_config"]["proj_output_dim"]}
  (out / "config.json").write_text(json.dumps(cfg))
  shutil.rmtree(apple)


def write_sharded(src, out, parts: int = 3):
  """`src`'s single model.safetensors split into `parts` files with a model.safetensors.index.json."""
  out.mkdir()
  tensors = load_file(str(src / "model.safetensors"))
  keys = sorted(tensors)
  names = [f"model-{i + 1:05d}-of-{parts:05d}.safetensors" for i in range(parts)]
  weight_map = {}
  for i, name in enumerate(names):
    chunk = keys[i::parts]
    save_file({k: tensors[k] for k in chunk}, str(out / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in chunk})
  (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  shutil.copy(src / "config.json", out / "config.json")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """name -> (PyTorch model, HF directory). Every parameter is random (no 0/1 initialisation to hide behind)."""
  root = tmp_path_factory.mktemp("sources")
  qwen_tied = build_tiny_qwen2(root / "qwen2_tied", seed=21, config_style="v4")
  qwen_untied = build_tiny_qwen2(root / "qwen2_untied", seed=22, tied=False)
  siglip_with_head = tiny_vision.build_tiny_siglip(root / "siglip_with_head", seed=26, use_head=True)
  aimv2 = tiny_vision.build_tiny_aimv2(root / "aimv2", seed=25)
  tiny_vision.write_apple_layout(aimv2, root / "aimv2_apple")
  bf16 = build_tiny_qwen2(root / "scratch", seed=28).to(torch.bfloat16)
  bf16.save_pretrained(root / "qwen2_bf16")
  # as released: the SigLIP pooling head is in the checkpoint (vit.head.*), unused by Flash-VL
  flashvl = build_tiny_flashvl(siglip_with_head, qwen_tied, intermediate=40, seed=27)
  save_released_layout(flashvl, root / "flashvl", image_token_num=4)
  write_sharded(root / "flashvl", root / "flashvl_sharded")
  flashvl_apple = build_tiny_flashvl(aimv2, qwen_untied, intermediate=48, seed=29)
  released_with_apple_vit(flashvl_apple, aimv2, root / "flashvl_apple")
  models = {
      "qwen2_tied": qwen_tied, "qwen2_untied": qwen_untied, "qwen2_bf16": bf16,
      "siglip": tiny_vision.build_tiny_siglip(root / "siglip", seed=23, use_head=True),
      "siglip_full": tiny_vision.build_tiny_siglip(root / "siglip_full", seed=24, full_model=True),
      "aimv2": aimv2, "aimv2_apple": aimv2, "flashvl": flashvl, "flashvl_apple": flashvl_apple,
      "flashvl_sharded": flashvl,
  }
  return {name: (model, root / name) for name, model in models.items()}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
  """name -> Orbax checkpoint written by `python -m convert hf`."""
  root = tmp_path_factory.mktemp("converted")
  for name, (_, path) in sources.items():
    assert run_cli("hf", path, "--out", root / name) == 0, name
  return {name: root / name for name in sources}


@nnx.jit
def _forward(module, *inputs):
  return module(*inputs)


def torch_output(model, name: str, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    if name.startswith("qwen2"):
      return model(torch.from_numpy(x.astype(np.int64))).logits.float().numpy()
  return tiny_vision.reference_outputs(model, x)["post_norm"]


def probe(name: str) -> np.ndarray:
  if name.startswith("qwen2"):
    return np.random.default_rng(0).integers(0, 160, (2, 11)).astype(np.int32)
  size = 28 if name.startswith("aimv2") else 32
  return tiny_vision.random_pixels(0, size, size)


def flashvl_probe(image_tokens: int, tiles: int):
  rng = np.random.default_rng(1)
  ids = np.asarray([list(rng.integers(0, 160, 4)) + [-200] + [-201] * (image_tokens - 1) + list(rng.integers(0, 160, 5))
                    for _ in range(2)], np.int32)
  size = 32 if tiles == 1 else 28
  pixels = tiny_vision.random_pixels(1, size, size, batch=2 * tiles)
  return ids, pixels if tiles == 1 else pixels.reshape(2, tiles, size, size, 3)


def torch_flashvl_logits(ref, ids, pixels) -> np.ndarray:
  with torch.no_grad():
    return ref(torch.from_numpy(ids.astype(np.int64)),
               torch.from_numpy(np.ascontiguousarray(np.moveaxis(pixels, -1, -3)))).numpy()


@pytest.mark.parametrize("name", COMPONENTS)
def test_components_match_torch_after_conversion(name, sources, converted):
  model, _ = sources[name]
  ours, info = checkpoint.load_module(converted[name])
  x = probe(name)
  expected = torch_output(model, name, x)
  err = np.abs(np.asarray(_forward(ours, x)) - expected).max()
  print(f"{name}: max abs diff {err:.2e} (outputs up to {np.abs(expected).max():.1f})")
  assert np.abs(expected).max() > 1.0 and err <= TOL
  assert info.architecture == name.split("_")[0]


def test_flashvl_with_apple_vit_matches_torch_after_conversion(sources, converted):
  """Released layout with Apple's AIMv2 keys and an untied LM head, two tiles per row (the static SigLIP
  variant is compared through `FlashVL.from_pretrained` in test_checkpoint.py)."""
  ref, _ = sources["flashvl_apple"]
  ours, info = checkpoint.load_module(converted["flashvl_apple"])
  ids, pixels = flashvl_probe(8, 2)
  expected = torch_flashvl_logits(ref, ids, pixels)
  err = np.abs(np.asarray(_forward(ours, ids, pixels)) - expected).max()
  print(f"flashvl_apple: logits max abs diff {err:.2e}")
  assert err <= TOL
  assert info.hf_layout["vision"] == "apple" and not info.config.llm.tie_word_embeddings


def exported_equals_source(source_dir, exported_dir, dropped=()) -> None:
  source, exported = SafetensorsReader(source_dir), SafetensorsReader(exported_dir)
  assert set(exported.keys()) == set(source.keys()) - set(dropped)
  for key in exported.keys():
    a, b = source.get(key), exported.get(key)
    assert a.dtype == b.dtype and a.shape == b.shape, key
    assert a.tobytes() == b.tobytes(), key


def load_with_transformers(name, path):
  from transformers import Aimv2VisionModel, Qwen2ForCausalLM, SiglipVisionModel

  if name == "aimv2_apple":
    return tiny_vision.read_apple_layout(path)
  cls = {"qwen2": Qwen2ForCausalLM, "siglip": SiglipVisionModel, "aimv2": Aimv2VisionModel}[name.split("_")[0]]
  return cls.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", COMPONENTS + ("qwen2_bf16",))
def test_component_round_trip_is_bit_exact(name, sources, converted, tmp_path):
  model, src = sources[name]
  assert run_cli("export", converted[name], "--out", tmp_path / "hf") == 0
  dropped = checkpoint.read_info(converted[name]).metadata["dropped_keys"]
  assert bool(dropped) == (name == "siglip_full")  # SiglipModel's text tower and logit scale/bias
  exported_equals_source(src, tmp_path / "hf", dropped)
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  if name.startswith("qwen2"):
    assert config["tie_word_embeddings"] == model.config.tie_word_embeddings
  # the export loads in transformers (or, for Apple's layout, through its own key names) and computes the same
  x = probe(name)
  again = load_with_transformers(name, tmp_path / "hf").to(model.dtype)
  np.testing.assert_allclose(torch_output(again, name, x), torch_output(model, name, x), atol=1e-6)


@pytest.mark.parametrize("name", FLASHVL)
def test_flashvl_round_trip_is_bit_exact(name, sources, converted, tmp_path):
  ref, src = sources[name]
  args = ["--max-shard-size", "30KB"] if name == "flashvl_sharded" else []
  assert run_cli("export", converted[name], "--out", tmp_path / "hf", *args) == 0
  carried = checkpoint.read_info(converted[name]).metadata["carried_keys"]
  assert bool(carried) == (name != "flashvl_apple") and all(k.startswith("vit.head.") for k in carried)
  exported_equals_source(src, tmp_path / "hf")  # every key, the carried SigLIP head included
  files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
  assert (len(files) > 1) == (name == "flashvl_sharded") == (tmp_path / "hf" / INDEX_FILE).is_file()
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["intermediate_size"] == ref.adp.p0[1].out_features and "vision_config" in config
  if name == "flashvl":  # the export runs in the PyTorch reference implementation
    ids, pixels = flashvl_probe(4, 1)
    np.testing.assert_array_equal(torch_flashvl_logits(load_released_layout(tmp_path / "hf"), ids, pixels),
                                  torch_flashvl_logits(ref, ids, pixels))


def test_sharded_source_converts_like_the_single_file(converted):
  single = param_arrays(checkpoint.load_module(converted["flashvl"])[0])
  sharded = param_arrays(checkpoint.load_module(converted["flashvl_sharded"])[0])
  assert single.keys() == sharded.keys()
  for k, v in sharded.items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(single[k]), err_msg=k)


def test_dtype_flag_casts_like_torch(sources, tmp_path):
  """fp32 -> `--dtype bfloat16` rounds exactly as torch's `.to(torch.bfloat16)`; bf16 sources stay bf16."""
  model, src = sources["qwen2_tied"]
  assert run_cli("hf", src, "--out", tmp_path / "ck", "--dtype", "bfloat16") == 0
  info = checkpoint.read_info(tmp_path / "ck")
  assert info.param_dtype == "bfloat16" and info.metadata["source_dtype"] == "float32"
  assert run_cli("export", tmp_path / "ck", "--out", tmp_path / "hf") == 0
  exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
  for key, value in model.state_dict().items():
    if key == "lm_head.weight":  # tied: not stored
      assert key not in exported
      continue
    assert exported[key].tobytes() == value.to(torch.bfloat16).view(torch.int16).numpy().tobytes(), key
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("name", ["qwen2_tied", "aimv2_apple"])
def test_verify_flag_prints_the_difference_and_a_verdict(name, sources, tmp_path, capsys, monkeypatch):
  assert run_cli("hf", sources[name][1], "--out", tmp_path / "ck", "--verify") == 0
  line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("verify:")][0]
  diff, allowed = (float(x) for x in re.findall(r"(?:difference to the PyTorch model|tolerance) (\S+?),? ", line))
  assert 0 < diff <= TOL and line.endswith(": PASS") and diff <= allowed
  monkeypatch.setattr("convert.verify.TOLERANCE", 0.0)  # the verdict can fail: exit 1
  assert run_cli("hf", sources[name][1], "--out", tmp_path / "ck2", "--verify") == 1
  assert capsys.readouterr().out.rstrip().endswith(": FAIL")


def test_inspect(sources, converted, tmp_path, capsys):
  assert run_cli("inspect", sources["siglip_full"][1]) == 0
  report = capsys.readouterr().out
  torch_count = sum(p.numel() for p in sources["siglip_full"][0].parameters())
  assert "architecture: siglip" in report and f"parameters: {torch_count:,}" in report
  assert "text_model.embeddings.token_embedding.weight [64, 32] float32 dropped" in report
  assert "keys our tables do not map: none" in report and "conversion check: ok" in report

  odd = tmp_path / "odd"
  shutil.copytree(sources["qwen2_untied"][1], odd)
  tensors = load_file(str(odd / "model.safetensors"))
  tensors["model.layers.0.mlp.extra.weight"] = np.ones((2, 2), np.float32)
  save_file(tensors, str(odd / "model.safetensors"))
  assert run_cli("inspect", odd) == 0
  report = capsys.readouterr().out
  assert "keys our tables do not map (1):\n  model.layers.0.mlp.extra.weight" in report
  assert "conversion check: FAILS" in report

  assert run_cli("inspect", converted["flashvl_apple"]) == 0
  report = capsys.readouterr().out
  assert "architecture: flashvl" in report and "'vision': 'apple'" in report
  assert ("encoder.layers.attention.q_proj.kernel [2, 64, 64] float32 -> vit.trunk.blocks.{i}.attn.qkv.weight"
          in report)
  assert "parameters our tables do not map: none" in report and "load check: ok" in report


def corrupt(src, out, change) -> None:
  shutil.copytree(src, out)
  tensors = load_file(str(out / "model.safetensors"))
  config = json.loads((out / "config.json").read_text())
  change(tensors, config)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(config))


ERROR_CASES = {
    "unknown architecture": (lambda t, c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]),
                             r"unknown architecture \(model_type='llama'"),
    "missing key": (lambda t, c: t.pop("model.layers.1.mlp.up_proj.weight"),
                    r"1 missing parameters.*\n\s+model\.layers\.1\.mlp\.up_proj\.kernel"),
    "unexpected key": (lambda t, c: t.update({"model.layers.0.self_attn.rotary.inv_freq": np.ones(8, np.float32)}),
                       r"1 unexpected keys.*\n\s+model\.layers\.0\.self_attn\.rotary\.inv_freq"),
    "shape mismatch": (lambda t, c: c.update(intermediate_size=80),
                       r"model\.layers\.0\.mlp\.down_proj\.weight \(64, 96\) -> "
                       r"model\.layers\.0\.mlp\.down_proj\.kernel: checkpoint gives \(96, 64\), "
                       r"model expects \(80, 64\)"),
    "dtype mismatch": (lambda t, c: t.update({"model.norm.weight": np.ones(64, np.int32)}),
                       r"model\.norm\.weight has dtype I32"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_name_the_problem(case, sources, tmp_path, capsys):
  change, message = ERROR_CASES[case]
  corrupt(sources["qwen2_untied"][1], tmp_path / "src", change)
  assert run_cli("hf", tmp_path / "src", "--out", tmp_path / "ck") == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "Traceback" not in err
  assert re.search(message, err), err
  assert not (tmp_path / "ck").exists() and not (tmp_path / f"ck{checkpoint.STAGING_SUFFIX}").exists()


def test_missing_source_and_weights(tmp_path, capsys):
  assert run_cli("hf", tmp_path / "nowhere", "--out", tmp_path / "ck") == 2
  assert "does not exist" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
  assert run_cli("hf", tmp_path / "empty", "--out", tmp_path / "ck") == 2
  assert "no weights found" in capsys.readouterr().err
  assert run_cli("export", tmp_path / "empty", "--out", tmp_path / "hf") == 2
  assert "is not a model checkpoint" in capsys.readouterr().err


def test_destination_guards(sources, tmp_path, capsys, monkeypatch):
  src = sources["qwen2_untied"][1]
  dst = tmp_path / "ck"
  assert run_cli("hf", src, "--out", dst) == 0
  assert run_cli("hf", src, "--out", dst) == 2
  assert "already holds a complete checkpoint; pass --overwrite" in capsys.readouterr().err
  assert run_cli("hf", src, "--out", dst, "--overwrite") == 0
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("keep me")
  assert run_cli("hf", src, "--out", tmp_path / "notes", "--overwrite") == 2
  assert "exists and is not a checkpoint" in capsys.readouterr().err
  assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"

  # an exception part-way (after some chunks reached Orbax) leaves nothing behind
  monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1)
  import convert.hf_to_orbax as hf_to_orbax

  real_import = hf_to_orbax.run_import

  def interrupted(*args):
    for i, item in enumerate(real_import(*args)):
      if i == 5:
        raise KeyboardInterrupt
      yield item

  monkeypatch.setattr(hf_to_orbax, "run_import", interrupted)
  assert run_cli("hf", src, "--out", tmp_path / "cut") == 130  # Ctrl-C: "interrupted", nothing left behind
  assert not list(tmp_path.glob("cut*"))


def test_killed_conversion_never_loads_and_rerun_completes(sources, converted, tmp_path, capsys):
  src, dst = sources["qwen2_untied"][1], tmp_path / "ck"
  script = f"""
import os, convert.hf_to_orbax as h, flashvl_jax.checkpoint as c
c.CHUNK_BYTES = 1
real = h.run_import
def dying(*args):
  for i, item in enumerate(real(*args)):
    if i == 9:
      os._exit(3)  # like SIGKILL: no cleanup runs
    yield item
h.run_import = dying
h.convert_hf({str(src)!r}, {str(dst)!r}, progress=False)
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  assert subprocess.run([sys.executable, "-c", script], env=env, capture_output=True).returncode == 3
  staging = tmp_path / f"ck{checkpoint.STAGING_SUFFIX}"
  assert staging.is_dir() and not dst.exists()
  with pytest.raises(checkpoint.CheckpointError, match="incomplete checkpoint"):
    checkpoint.load_module(staging)
  with pytest.raises(checkpoint.CheckpointError, match="was never completed"):
    checkpoint.load_module(dst)
  # a writer that is still alive is not disturbed
  writer = json.loads((staging / checkpoint.WRITER_FILE).read_text())
  (staging / checkpoint.WRITER_FILE).write_text(json.dumps({**writer, "pid": os.getppid()}))
  assert run_cli("hf", src, "--out", dst) == 2
  assert f"is being written by process {os.getppid()}" in capsys.readouterr().err
  # the dead writer's leftovers are replaced by a complete conversion
  (staging / checkpoint.WRITER_FILE).write_text(json.dumps(writer))
  assert run_cli("hf", src, "--out", dst) == 0
  assert not staging.exists()
  fresh = param_arrays(checkpoint.load_module(dst)[0])
  for name, value in param_arrays(checkpoint.load_module(converted["qwen2_untied"])[0]).items():
    np.testing.assert_array_equal(np.asarray(fresh[name]), np.asarray(value), err_msg=name)


def test_assemble(sources, tmp_path, capsys):
  """siglip (its MAP head dropped) + tied Qwen2 + a fresh adapter; exported, it runs in the PyTorch reference."""
  siglip, siglip_dir = sources["siglip"]
  qwen, qwen_dir = sources["qwen2_tied"]
  assert run_cli("assemble", "--vision", siglip_dir, "--llm", qwen_dir, "--out", tmp_path / "ck",
                 "--adapter-width", "24", "--seed", "5") == 0
  model, info = checkpoint.load_module(tmp_path / "ck")
  assert info.config.tiling.mode == "static" and info.config.adapter.intermediate_size == 24
  assert info.metadata["image_token_num"] == 4 and not hasattr(model.vit, "head")
  assert model.adp.linear_1.kernel.shape == (256, 24) and model.adp.proj.kernel.shape == (24, 64)
  assert np.abs(np.asarray(model.adp.linear_2.kernel.get_value())).max() > 0  # initialised, not zeros
  assert run_cli("export", tmp_path / "ck", "--out", tmp_path / "hf") == 0
  exported = SafetensorsReader(tmp_path / "hf")
  for key, value in qwen.state_dict().items():
    if key != "lm_head.weight":
      np.testing.assert_array_equal(exported.get(f"llm.{key}"), value.numpy(), err_msg=key)
  for key, value in siglip.state_dict().items():
    if not key.startswith("head."):
      np.testing.assert_array_equal(exported.get(f"vit.{key}"), value.numpy(), err_msg=key)
  ids, pixels = flashvl_probe(4, 1)
  err = np.abs(np.asarray(_forward(model, ids, pixels)) -
               torch_flashvl_logits(load_released_layout(tmp_path / "hf"), ids, pixels)).max()
  assert err <= TOL, err

  # a preset gives the adapter kind and tiling; the Apple layout is kept for export
  assert run_cli("assemble", "--vision", sources["aimv2_apple"][1], "--llm", sources["qwen2_untied"][1], "--out",
                 tmp_path / "ck2", "--preset", "flashvl-2b-dynamic", "--adapter-width", "16") == 0
  info = checkpoint.read_info(tmp_path / "ck2")
  assert info.config.tiling.mode == "dynamic" and info.hf_layout["vision"] == "apple"
  assert run_cli("export", tmp_path / "ck2", "--out", tmp_path / "hf2") == 0
  assert "vit.trunk.blocks.0.attn.qkv.weight" in SafetensorsReader(tmp_path / "hf2").keys()
  assert run_cli("assemble", "--vision", sources["aimv2"][1], "--llm", qwen_dir, "--out", tmp_path / "ck3",
                 "--preset", "flashvl-2b-static") == 2
  assert "preset 'flashvl-2b-static' expects a 'siglip' vision tower" in capsys.readouterr().err
