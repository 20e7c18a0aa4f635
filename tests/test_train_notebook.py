"""notebooks/finetune.ipynb runs top to bottom in tiny mode (FLASHVL_FINETUNE_TINY=1): it writes a JSONL + image
dataset, trains on it, chats with the result and reloads the exported model checkpoint."""

import json
import pathlib

import nbclient
import nbformat

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "finetune.ipynb"


def test_finetune_notebook_runs_in_tiny_mode(tmp_path, monkeypatch):
  monkeypatch.setenv("FLASHVL_FINETUNE_TINY", "1")
  monkeypatch.setenv("FLASHVL_FINETUNE_DIR", str(tmp_path / "work"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel, as in Colab
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, errors[0].get("evalue")
  run = tmp_path / "work" / "run"
  steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps[-1] == 8 and (run / "model" / "metadata.json").is_file()
  final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
  assert {"eval/loss", "eval/accuracy"} <= set(final)
  chat_output = "".join(o.get("text", "") for o in notebook.cells[9].get("outputs", []))
  assert chat_output.count("-> ") == 3  # three questions answered
