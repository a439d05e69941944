"""Every course notebook runs end to end (quick settings) from its jupytext source; committed copies carry outputs."""
from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import ROOT

EXPERIMENTS = ROOT / "experiments"
SOURCES = sorted(EXPERIMENTS.glob("[0-9][0-9]_*.py"))


def runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", EXPERIMENTS / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_ten_notebooks_each_committed_with_outputs():
    assert len(SOURCES) == 10
    for source in SOURCES:
        notebook = EXPERIMENTS / f"{source.stem}.ipynb"
        assert notebook.is_file(), f"{notebook.name} is not committed"
        cells = json.loads(notebook.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code and all(c.get("execution_count") for c in code), f"{notebook.name} has unexecuted cells"
        assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
                   for c in code for o in c["outputs"]), f"{notebook.name} shows no figure"


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
@pytest.mark.slow
def test_notebook_executes_in_ci_mode(source, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFEXP_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("DIFFEXP_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("DIFFEXP_CACHE", str(tmp_path / "cache"))
    target = runner().execute(source, tmp_path / "out", mode="ci", timeout=600)
    cells = json.loads(target.read_text())["cells"]
    errors = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"] if o.get("output_type") == "error"]
    assert not errors
