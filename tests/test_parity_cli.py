"""`python -m flashvl_jax.parity` runs every comparison and reports each row; a failing row fails the command."""

from flashvl_jax import parity


def test_parity_cli_passes_and_lists_every_component(tmp_path, capsys):
  assert parity.main(["--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  for name in ("SigLIP last_hidden_state", "AIMv2 (Apple layout)", "Qwen2 logits, left padding",
               "Qwen2 logits, positions ~30,000", "Flash-VL static (SigLIP) logits", "Flash-VL 2-tile (AIMv2) logits",
               "top-1 agreement"):
    assert name in out
  assert "FAIL" not in out


def test_failing_row_fails_the_command(monkeypatch, capsys):
  monkeypatch.setattr(parity, "SECTIONS", (lambda root: [parity._compare("broken", [1.0, 2.0], [1.0, 2.5])],))
  assert parity.main([]) == 1
  out = capsys.readouterr().out
  assert "FAIL" in out and "FAILED: broken" in out
