"""Schemathesis against `bertqa serve`'s own /openapi.json (issue 22, item 7, the HTTP half), bounded for CI.

`python -m bertqa serve` on a tiny model (tests/qa_helpers.py write_answering_model) on a free 127.0.0.1 port with
small limits (so that generated requests reach them), then `schemathesis run --checks all` with a fixed seed and
a fixed number of examples per operation: every response must conform to the document (no 5xx, documented status
codes, content types and bodies), schema-valid requests must be answered and schema-invalid ones refused. 413 is
an accepted answer to a schema-valid request: the payload, question and window limits are not all expressible
in JSON Schema (questions are counted over all records, windows after tokenizing). The server's log must hold no
traceback.

FUZZ_EXAMPLES (default 60) sets the examples per operation; the run takes ~10-30 s on 2 cores at the default.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from qa_helpers import free_port, http_call, write_answering_model

pytest.importorskip("schemathesis", reason="schemathesis is in the [test] extra: pip install 'bertqa[test]'")

CONFIG = textwrap.dedent("""
    [checks.positive_data_acceptance]
    expected-statuses = ["2xx", "413"]

    [checks.negative_data_rejection]
    expected-statuses = ["400", "404", "405", "406", "413", "415", "422"]
""")
HOOKS = textwrap.dedent('''
    import json

    import schemathesis


    @schemathesis.deserializer("application/jsonlines")
    def jsonlines(ctx, response):
        return [json.loads(line) for line in response.content.decode("utf-8").splitlines() if line.strip()]
''')


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = write_answering_model(root / "model")
    port = free_port()
    log_path = root / "server.log"
    cmd = [sys.executable, "-m", "bertqa", "serve", "--model-dir", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--max-payload-mb", "0.05", "--max-questions", "50", "--max-windows", "40",
           "--max-queue", "200", "--max-seq-length", "64", "--doc-stride", "16", "--max-query-length", "16",
           "--max-batch-size", "8"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    if http_call(port, "GET", "/ping", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "server did not become ready"
                time.sleep(0.1)
            yield port, log_path, root
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_schemathesis_finds_no_nonconforming_response(fuzz_server):
    port, log_path, root = fuzz_server
    (root / "schemathesis.toml").write_text(CONFIG)
    (root / "fuzz_hooks.py").write_text(HOOKS)
    examples = os.environ.get("FUZZ_EXAMPLES", "60")
    env = dict(os.environ, SCHEMATHESIS_HOOKS="fuzz_hooks",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(root / "schemathesis.toml"), "run",
           f"http://127.0.0.1:{port}/openapi.json", "--checks", "all", "--max-examples", examples, "--seed", "22",
           "--workers", "1", "--request-timeout", "30", "--no-color", "--generation-deterministic"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    out = proc.stdout + proc.stderr
    print(out[-4000:])
    assert proc.returncode == 0, out[-8000:]
    assert "Schema validation skipped" not in out, out[-3000:]
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log and " 500 " not in log, log[-5000:]
