"""The tutorial notebooks: committed with the outputs of a real run, and still executing.

CI runs each notebook top to bottom in its quick mode (``BERT_GLUON_QUICK=1``); a cell
that raises fails the test.
"""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import data_dir

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "notebooks")
NOTEBOOKS = ["bert_pretraining.ipynb", "bert_finetune_mrpc.ipynb"]


def _read(name):
    return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_outputs_come_from_one_run_in_order(name):
    code = [c for c in _read(name).cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), \
        f"{name}: cells not executed once, top to bottom (execution counts {counts})"
    for i, cell in enumerate(code, start=1):
        assert cell.outputs, f"{name}: code cell {i} has no output"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{name}: code cell {i} raised {errors[0].ename}"
    figures = sum(1 for c in code for o in c.outputs if "image/png" in o.get("data", {}))
    assert figures >= 1, f"{name}: expected plots in the committed outputs, found none"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_in_quick_mode(name, tmp_path, monkeypatch):
    env = {"MRPC_DIR": data_dir("MRPC_DIR", "mrpc"),
           "WIKITEXT2_DIR": data_dir("WIKITEXT2_DIR", "wikitext-2"),
           "BERT_VOCAB": os.environ.get("BERT_VOCAB") or os.path.join(
               data_dir("BERT_VOCAB_DIR", "vocab"), "bert-base-uncased-vocab.txt")}
    wiki = [os.path.join(env["WIKITEXT2_DIR"], f"wiki.{s}.tokens") for s in ("valid", "test")]
    mrpc = [os.path.join(env["MRPC_DIR"], f) for f in ("train.tsv", "dev.tsv")]
    needs = {"bert_pretraining.ipynb": [env["BERT_VOCAB"]] + wiki,
             "bert_finetune_mrpc.ipynb": mrpc}[name]
    missing = [f for f in needs if not os.path.exists(f)]
    if missing:
        pytest.skip(f"{name} needs {missing[0]} (set MRPC_DIR / WIKITEXT2_DIR / BERT_VOCAB)")
    monkeypatch.setenv("BERT_GLUON_QUICK", "1")
    monkeypatch.setenv("BERT_GLUON_RUN_DIR", str(tmp_path / "run"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = _read(name)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": NOTEBOOK_DIR}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
