"""notebooks/quickstart.ipynb runs top to bottom on a tiny checkpoint (FLASHVL_QUICKSTART_TINY=1): it writes a
random released-layout checkpoint, converts it with `python -m convert hf`, loads, chats, streams and samples."""


def test_quickstart_runs_on_a_tiny_checkpoint(tmp_path, run_notebook):
  notebook = run_notebook("quickstart.ipynb", {"FLASHVL_QUICKSTART_TINY": "1",
                                               "FLASHVL_QUICKSTART_DIR": str(tmp_path / "work")}, timeout=300)
  text = lambda output: output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
  outputs = {i: "".join(text(o) for o in cell.get("outputs", []))
             for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
  assert (tmp_path / "work" / "orbax" / "metadata.json").is_file()
  assert "model.safetensors" in outputs[4] and "wrote" in outputs[6]
  assert "static [CpuDevice(id=0)]" in outputs[8]
  answers = [outputs[i].strip() for i in (10, 11)]
  assert all(answers)  # a first answer and a follow-up, both non-empty
  assert len(outputs[15].strip().splitlines()) == 2  # the batch: one sampled answer per row
