"""`flashvl_jax.checkpoint`: save_model / load_model, restore into any mesh, dtype casts, `FlashVL.from_pretrained`.

The reference is a tiny random Flash-VL (SigLIP 32px -> 4 image tokens, Qwen2 with 160 tokens) written by PyTorch in
the released layout; logits are compared in fp32 with the tolerance of the parity tests.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from flax import nnx
from jax.sharding import PartitionSpec

from convert.export import export_checkpoint
from convert.hf_to_orbax import convert_hf
from flashvl_jax import checkpoint, sharding
from flashvl_jax.api import FlashVL
from flashvl_jax.config import FlashVLConfig
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.testing.tiny_qwen2 import build_tiny_qwen2
from flashvl_jax.train.config import load_train_config
from flashvl_jax.train.trainer import train
from flashvl_jax.testing.tiny_vision import build_tiny_siglip, random_pixels
from flashvl_jax.testing.torch_flashvl import build_tiny_flashvl, save_released_layout
from flashvl_jax.weights.hf_io import CheckpointError, SafetensorsReader, param_arrays

TOL = 1e-4
VOCAB = 160
IMAGE_TOKENS = 4


def placeholder_ids(seed: int, batch: int = 2) -> np.ndarray:
  rng = np.random.default_rng(seed)
  image = [-200] + [-201] * (IMAGE_TOKENS - 1)
  return np.asarray([list(rng.integers(0, VOCAB, 5)) + image + list(rng.integers(0, VOCAB, 6)) for _ in range(batch)],
                    np.int32)


def torch_logits(ref, ids, pixels_nhwc=None) -> np.ndarray:
  pixels = None if pixels_nhwc is None else torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return ref(torch.from_numpy(ids.astype(np.int64)), pixels).numpy()


@nnx.jit
def _wrapper_logits(module, ids, pixels):
  return FlashVL(module, processor=object())(ids, pixels)


def forward(model: FlashVL, ids, pixels=None) -> np.ndarray:
  """`model(ids, pixels)` (the public wrapper's call), jitted: op-by-op dispatch costs ~10 s on first use."""
  return np.asarray(_wrapper_logits(model.module, jnp.asarray(ids), None if pixels is None else jnp.asarray(pixels)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(torch reference, released-layout HF dir, its Orbax conversion)."""
  root = tmp_path_factory.mktemp("ckpt")
  vit = build_tiny_siglip(root / "siglip", seed=11)
  llm = build_tiny_qwen2(root / "qwen2", seed=12)
  ref = build_tiny_flashvl(vit, llm, intermediate=48, seed=13)
  hf_dir = save_released_layout(ref, root / "hf", image_token_num=IMAGE_TOKENS)
  return ref, hf_dir, convert_hf(hf_dir, root / "orbax", progress=False)


def test_from_pretrained_logits_match_torch(tiny):
  ref, hf_dir, ckpt = tiny
  ids, pixels = placeholder_ids(0), random_pixels(0, 32, 32)
  expected = torch_logits(ref, ids, pixels)
  text_ids = np.random.default_rng(1).integers(0, VOCAB, (2, 9)).astype(np.int32)
  assert np.abs(expected).max() > 1.0
  model = FlashVL.from_pretrained(str(ckpt))
  assert model.config.dtype == "float32" and model.tokenizer is not None
  err = np.abs(forward(model, ids, pixels) - expected).max()
  text_err = np.abs(forward(model, text_ids) - torch_logits(ref, text_ids)).max()
  print(f"Orbax checkpoint: logits max abs diff {err:.2e} (image), {text_err:.2e} (text only)")
  assert err <= TOL and text_err <= TOL
  # the comparison can fail: other pixels move the logits after the image block far beyond the tolerance
  assert np.abs(forward(model, ids, random_pixels(1, 32, 32)) - expected)[:, 5:].max() > 100 * TOL
  on_the_fly = FlashVL.from_pretrained(str(hf_dir))  # an HF directory, converted while loading
  hf_err = np.abs(forward(on_the_fly, ids, pixels) - expected).max()
  print(f"HF directory: logits max abs diff {hf_err:.2e}")
  assert hf_err <= TOL


def test_restore_into_other_meshes(tiny, tmp_path, monkeypatch):
  """Loaded into (1,8,1), saved, restored into (2,2,2), (1,4,2) and one device: equal arrays, rule shardings."""
  _, hf_dir, _ = tiny
  reference = {k: np.asarray(v) for k, v in param_arrays(checkpoint.load_module(hf_dir)[0]).items()}
  source_mesh = sharding.make_mesh((1, 8, 1))
  model, _ = checkpoint.load_module(hf_dir, mesh=source_mesh)
  embed = model.llm.model.embed_tokens.embedding.get_value()
  assert embed.sharding.spec == PartitionSpec(None, "fsdp") and len(embed.sharding.device_set) == 8
  path = checkpoint.save_model(tmp_path / "saved", model, metadata={"step": 7})

  targets = []
  real_load = checkpoint.ocp.load
  monkeypatch.setattr(checkpoint.ocp, "load", lambda p, target: targets.append(target) or real_load(p, target))
  for shape, embed_spec in (((2, 2, 2), PartitionSpec("tensor", "fsdp")), ((1, 4, 2), PartitionSpec("tensor", "fsdp")),
                            (None, None)):
    mesh = None if shape is None else sharding.make_mesh(shape)
    restored, tokenizer = checkpoint.load_model(path, mesh=mesh)
    assert tokenizer == "qwen2.5"
    arrays = param_arrays(restored)
    assert arrays.keys() == reference.keys()
    for name, value in arrays.items():
      np.testing.assert_array_equal(np.asarray(value), reference[name], err_msg=name)
    # Orbax was asked for arrays already in their final shardings (no whole-model copy on one device first).
    requested = checkpoint.flatten_tree(targets[-1])
    if mesh is None:
      assert all(len(v.devices()) == 1 for v in arrays.values())
      continue
    abstract = nnx.state(checkpoint.abstract_module("flashvl", restored.config, None), nnx.Param)
    rules = {k: s for k, (_, s) in checkpoint.flat_params(sharding.state_shardings(abstract, mesh)).items()}
    for name, value in arrays.items():
      assert value.sharding.spec == rules[name].spec, name
      assert requested[name].sharding == rules[name], name
    assert arrays["llm.model.embed_tokens.embedding"].sharding.spec == embed_spec
    assert max(len(v.sharding.device_set) for v in arrays.values()) == 8


def test_save_model_files_and_metadata(tiny, tmp_path):
  _, hf_dir, _ = tiny
  model, _ = checkpoint.load_module(hf_dir)
  path = checkpoint.save_model(tmp_path / "m", model, metadata={"step": 3})
  meta = json.loads((path / checkpoint.METADATA_FILE).read_text())
  assert meta["format"] == checkpoint.FORMAT and meta["format_version"] == checkpoint.FORMAT_VERSION
  assert meta["architecture"] == "flashvl" and meta["param_dtype"] == "float32" and meta["step"] == 3
  assert meta["num_params"] == sum(int(np.prod(v.shape)) for v in param_arrays(model).values())
  cfg = yaml.safe_load((path / checkpoint.CONFIG_FILE).read_text())
  assert checkpoint.read_info(path).config == model.config and cfg["adapter"]["intermediate_size"] == 48
  assert not list(tmp_path.glob("*" + checkpoint.STAGING_SUFFIX))
  with pytest.raises(FileExistsError, match="already holds a complete checkpoint"):
    checkpoint.save_model(path, model)
  checkpoint.save_model(path, model, overwrite=True)  # replaces it
  assert checkpoint.is_model_checkpoint(path)


def test_dtype_cast_at_restore(tiny):
  _, _, ckpt = tiny
  fp32 = param_arrays(checkpoint.load_model(ckpt)[0])
  model, _ = checkpoint.load_model(ckpt, dtype="bfloat16")
  assert model.config.dtype == "bfloat16" and model.config.param_dtype == "bfloat16"
  for name, value in param_arrays(model).items():
    assert value.dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(np.asarray(value), np.asarray(fp32[name]).astype(jnp.bfloat16), err_msg=name)


def test_relative_path_loads(tiny, monkeypatch):
  """`FlashVL.from_pretrained("runs/demo/model")` from the working directory (Orbax itself wants absolute paths)."""
  _, _, ckpt = tiny
  monkeypatch.chdir(ckpt.parent)
  model, _ = checkpoint.load_model(ckpt.name)
  expected = param_arrays(checkpoint.load_model(ckpt)[0])
  for name, value in param_arrays(model).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[name]), err_msg=name)


LORA = ["lora.rank=2", r"optimizer.trainable=['\.lora_(a|b)$']"]


@pytest.mark.parametrize("overrides", [["model.frozen_dtype=bfloat16", r"optimizer.trainable=['adp\..*']"], LORA],
                         ids=["frozen-bf16", "lora"])
def test_a_training_step_exports_like_the_final_model(tmp_path, overrides):
  """`convert export runs/x/checkpoints/N`: the step's parameters (frozen ones too, LoRA merged), the init's HF
  layout and its carried tensors; a step is not a model checkpoint for the loaders, and says how to export it."""
  cfg = load_train_config("tiny", [f"output_dir={tmp_path / 'run'}", "steps=2", "checkpoint.every_steps=2",
                                   "eval.accuracy=false", "data.eval_size=8", f"model.init={tmp_path / 'init'}",
                                   *overrides])
  model = FlashVLModel(cfg.model.flashvl_config(), rngs=nnx.Rngs(3))
  head = {"vit.head.probe": np.random.default_rng(0).standard_normal((1, 1, 32)).astype(np.float32)}
  checkpoint.save_model(tmp_path / "init", model, carried=head)
  train(cfg)
  step = tmp_path / "run" / "checkpoints" / "2"
  from_step = export_checkpoint(step, tmp_path / "from_step", progress=False)
  final = export_checkpoint(tmp_path / "run" / "model", tmp_path / "final", progress=False)
  a, b = SafetensorsReader(from_step), SafetensorsReader(final)
  assert a.keys() == b.keys() and "vit.head.probe" in a.keys() and not any("lora" in k for k in a.keys())
  for key in a.keys():
    assert a.get(key).tobytes() == b.get(key).tobytes(), key
  exported = a.get("vit.head.probe")  # in the export's dtype, like every other tensor (bfloat16 when all are frozen)
  assert exported.tobytes() == head["vit.head.probe"].astype(exported.dtype).tobytes()
  with pytest.raises(CheckpointError, match="training checkpoint step.*convert export"):
    checkpoint.load_model(step)


def test_tokenizer_source(tiny, tmp_path):
  _, hf_dir, _ = tiny
  with_tokenizer = tmp_path / "hf_tok"
  with_tokenizer.mkdir()
  for f in hf_dir.iterdir():
    (with_tokenizer / f.name).write_bytes(f.read_bytes())
  for name in ("vocab.json", "merges.txt", "generation_config.json"):
    (with_tokenizer / name).write_text("{}")
  ckpt = convert_hf(with_tokenizer, tmp_path / "orbax", progress=False)
  assert (ckpt / "vocab.json").is_file() and (ckpt / "generation_config.json").is_file()
  assert checkpoint.load_model(ckpt)[1] == str(ckpt)
  assert checkpoint.tokenizer_source(hf_dir) == "qwen2.5"


def test_load_errors(tiny, tmp_path):
  _, _, ckpt = tiny
  qwen = convert_hf(ckpt.parent / "qwen2", tmp_path / "qwen", progress=False)
  with pytest.raises(CheckpointError, match="holds a 'qwen2' model, not 'flashvl'.*assemble"):
    checkpoint.load_model(qwen)
  with pytest.raises(CheckpointError, match="does not exist"):
    checkpoint.load_model(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="is not a model checkpoint"):
    checkpoint.load_model(tmp_path / "empty")
  # a checkpoint whose params do not match its config names the offending parameters
  broken = tmp_path / "broken"
  broken.mkdir()
  for f in ckpt.iterdir():
    if f.is_file():
      (broken / f.name).write_bytes(f.read_bytes())
  (broken / checkpoint.PARAMS_DIR).symlink_to(qwen / checkpoint.PARAMS_DIR)
  with pytest.raises(ValueError, match=r"missing parameters:\n.*adp\.linear_1\.bias"):
    checkpoint.load_model(broken)
  cfg = yaml.safe_load((ckpt / checkpoint.CONFIG_FILE).read_text())
  cfg["llm"]["intermediate_size"] = 80
  (broken / checkpoint.CONFIG_FILE).write_text(yaml.safe_dump(cfg))
  (broken / checkpoint.PARAMS_DIR).unlink()
  (broken / checkpoint.PARAMS_DIR).symlink_to(ckpt / checkpoint.PARAMS_DIR)
  with pytest.raises(ValueError, match=r"llm\.model\.layers\.mlp\.down_proj\.kernel: checkpoint \(2, 96, 64\), "
                     r"model \(2, 80, 64\)"):
    checkpoint.load_model(broken)
  assert isinstance(checkpoint.read_info(ckpt).config, FlashVLConfig)
