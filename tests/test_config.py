"""Typed YAML configs: presets load, bad keys / types / values are errors that name the key."""

import pytest

from flashvl_jax import config
from flashvl_jax.config import ConfigError, FlashVLConfig, load_config


def test_every_preset_loads_and_round_trips():
  names = config.preset_names()
  assert {"flashvl-2b-static", "flashvl-2b-dynamic", "flashvl-2b-dynamic-iss", "tiny-static", "tiny-dynamic",
          "tiny-iss"} <= set(names)
  for name in names:
    cfg = load_config(name)
    assert config.from_dict(FlashVLConfig, config.to_dict(cfg)) == cfg


def test_full_size_presets_hold_the_published_geometry():
  static, iss = load_config("flashvl-2b-static"), load_config("flashvl-2b-dynamic-iss")
  assert (static.vision.kind, static.vision.grid_size, static.vision.norm_eps, static.tiling.mode) == ("siglip", 32,
                                                                                                          1e-6, "static")
  assert (iss.vision.kind, iss.vision.grid_size, iss.vision.norm_eps, iss.tiling.mode) == ("aimv2", 32, 1e-5, "iss")
  assert static.llm.rope_theta == 1e6 and static.llm.num_key_value_heads == 2 and static.tokens_per_tile == 256


@pytest.mark.parametrize("overrides, message", [
    (["llm.hiden_size=8"], "unknown config key 'llm.hiden_size' (did you mean 'hidden_size'?)"),
    (["visoin.kind=siglip"], "unknown config key 'visoin' (did you mean 'vision'?)"),
    (["tiling.mode=mosaic"], "tiling.mode: 'mosaic' is not one of"),
    (["llm.num_hidden_layers=two"], "llm.num_hidden_layers: expected an integer"),
    (["tiling.thumbnail=3"], "tiling.thumbnail: expected true/false"),
    (["llm.num_key_value_heads=5"], "not a multiple of num_key_value_heads 5"),
    (["vision.patch_size=7"], "not a multiple of patch_size 7"),
    (["tiling.max_tiles=0"], "tiling.max_tiles must be >= 1"),
    (["no_equals_sign"], "must look like key=value"),
    (['llm.rope_theta="1e4'], "llm.rope_theta=\"1e4': the value is not valid YAML"),
])
def test_bad_overrides_name_the_key(overrides, message):
  with pytest.raises(ConfigError) as err:
    load_config("tiny-static", overrides)
  assert message in str(err.value)


def test_overrides_parse_yaml_scalars():
  cfg = load_config("tiny-iss", ["llm.rope_theta=1e4", "tiling.max_tiles=6", "dtype=bfloat16"])
  assert cfg.llm.rope_theta == 1e4 and cfg.tiling.max_tiles == 6 and cfg.dtype == "bfloat16"


def test_yaml_files_and_missing_presets(tmp_path):
  path = tmp_path / "mine.yaml"
  path.write_text("name: mine\nvision: {kind: aimv2, image_size: 56, patch_size: 7}\nllm: {vocab_size: 99}\n")
  cfg = load_config(path)
  assert cfg.vision.kind == "aimv2" and cfg.llm.vocab_size == 99
  with pytest.raises(ConfigError, match="did you mean 'tiny-static'"):
    load_config("tiny-statik")
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(tmp_path / "absent.yaml")
  (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
  with pytest.raises(ConfigError, match="top level must be a mapping"):
    load_config(tmp_path / "list.yaml")
