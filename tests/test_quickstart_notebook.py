"""notebooks/quickstart.ipynb runs top to bottom on a tiny checkpoint (FLASHVL_QUICKSTART_TINY=1): it writes a
random released-layout checkpoint, converts it with `python -m convert hf`, loads, chats, streams and samples."""

import pathlib

import nbclient
import nbformat

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setenv("FLASHVL_QUICKSTART_TINY", "1")
  monkeypatch.setenv("FLASHVL_QUICKSTART_DIR", str(tmp_path / "work"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel, as in Colab
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = lambda output: output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
  outputs = {i: "".join(text(o) for o in cell.get("outputs", []))
             for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
  assert not any(o.get("output_type") == "error" for cell in notebook.cells for o in cell.get("outputs", []))
  assert (tmp_path / "work" / "orbax" / "metadata.json").is_file()
  assert "model.safetensors" in outputs[3] and "wrote" in outputs[5]
  assert "static [CpuDevice(id=0)]" in outputs[7]
  answers = [outputs[i].strip() for i in (9, 10)]
  assert all(answers)  # a first answer and a follow-up, both non-empty
  assert len(outputs[14].strip().splitlines()) == 2  # the batch: one sampled answer per row
