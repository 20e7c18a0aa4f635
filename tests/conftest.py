"""Test session setup: 8 fake CPU devices (set before JAX is imported) and fp32 everywhere."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import nbclient  # noqa: E402
import nbformat  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


@pytest.fixture
def run_notebook(tmp_path, monkeypatch):
  """`run_notebook(name, env, timeout)`: executes notebooks/<name> in a fresh kernel on one CPU device (as in Colab),
  in `tmp_path`, with `env` set; returns the executed notebook."""

  def run(name: str, env: dict[str, str], timeout: int):
    for key, value in {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}.items():
      monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors[0].get("evalue")
    return notebook

  return run
