"""notebooks/finetune.ipynb runs top to bottom in tiny mode (FLASHVL_FINETUNE_TINY=1): it writes a JSONL + image
dataset, trains on it, chats with the result and reloads the exported model checkpoint."""

import json


def test_finetune_notebook_runs_in_tiny_mode(tmp_path, run_notebook):
  notebook = run_notebook("finetune.ipynb", {"FLASHVL_FINETUNE_TINY": "1", "FLASHVL_FINETUNE_DIR": str(tmp_path / "work")},
                          timeout=600)
  run = tmp_path / "work" / "run"
  steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps[-1] == 8 and (run / "model" / "metadata.json").is_file()
  final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
  assert {"eval/loss", "eval/accuracy"} <= set(final)
  chat_output = "".join(o.get("text", "") for o in notebook.cells[10].get("outputs", []))
  assert chat_output.count("-> ") == 3  # three questions answered
