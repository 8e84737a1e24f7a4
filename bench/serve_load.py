"""Load benchmark of the endpoint (bertqa serve): N concurrent clients for a fixed time against local servers
running all-MiniLM-L6-v2, dynamic batching on versus off, then resident memory over 10,000 requests.

    python bench/serve_load.py                 # short and SQuAD requests; concurrency 1, 4, 16; 10,000 requests
    python bench/serve_load.py --payload squad --duration 5 --rss-requests 0 --concurrency 1 16     # quicker
    python bench/serve_load.py --output bench/serve_load_results.md
    python bench/serve_load.py --device cuda --model DIR ...    # on a GPU (bench/gpu_check.sh: a random-weight
                                                                # MiniLM-shaped model; QPS needs no trained weights)
    python bench/serve_load.py --precision fp32 --versus-precision int8   # two batching servers, fp32 against int8

With --versus-precision the two servers are both batching and differ in their precision (`bertqa serve
--precision`) instead: the first column of the table is then the precision, and the ratio the second's QPS over
the first's.

Two servers (batching on, batching off) are started side by side as subprocesses (`python -m bertqa.serve`), both
loaded and warm, and the cells are measured alternately (on, off, off, on, ...; `--repeats` rounds), so that both
modes see the same machine: this machine is shared and noisy, and the ratio on/off is the figure that matters.
Each client is a thread with one keep-alive HTTP/1.1 connection that sends its next request as soon as the
previous answer arrives (closed loop). Requests are SQuAD dev questions (../shared/data/squad/valid.json or
$BERTQA_DATA_DIR, else a built-in example), one per request, with either their whole paragraph ("squad", ~180
tokens) or only the sentence that holds the answer ("short", ~45 tokens).

Reported per cell: QPS, latency p50/p95/p99 (ms), errors (non-200 answers or failed connections), and the server's
mean engine batch (windows per engine call, from GET /stats). Then, on the batching-on server at the highest
concurrency: resident memory (RSS) of the server process after warm-up, after the first 100 requests and after
--rss-requests requests.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BERTQA_DATA_DIR", REPO.parent / "shared" / "data"))
FALLBACK = [{
    "question": "Which NFL team represented the AFC at Super Bowl 50?",
    "context": "Super Bowl 50 was an American football game to determine the champion of the National Football "
               "League (NFL) for the 2015 season. The American Football Conference (AFC) champion Denver Broncos "
               "defeated the National Football Conference (NFC) champion Carolina Panthers 24–10 to earn their "
               "third Super Bowl title. The game was played on February 7, 2016, at Levi's Stadium in the San "
               "Francisco Bay Area at Santa Clara, California.",
}]


def answer_sentence(context: str, start: int) -> str:
    """The sentence of context around character start (split at '. ')."""
    lo = context.rfind(". ", 0, start)
    hi = context.find(". ", start)
    return context[lo + 2 if lo >= 0 else 0:hi + 1 if hi >= 0 else len(context)].strip()


def payloads(kind: str, limit: int = 2000) -> tuple[list[bytes], str]:
    """Request bodies: "squad" = question + whole paragraph (one window of ~180 tokens on average), "short" =
    question + the paragraph's sentence holding the answer (~45 tokens)."""
    path = DATA_DIR / "squad" / "valid.json"
    if not path.is_file():
        records = [dict(r) for r in FALLBACK]
        if kind == "short":
            for r in records:
                r["context"] = r["context"].split(". ")[1] + "."
        return [json.dumps(r).encode() for r in records], f"a built-in SQuAD example ({kind})"
    from bertqa.squad import load_squad

    examples = load_squad(path)[:limit]
    if kind == "squad":
        records = [{"question": e.question, "context": e.context} for e in examples]
        what = "question + its whole paragraph"
    else:
        records = [{"question": e.question, "context": answer_sentence(e.context, e.answer_starts[0])}
                   for e in examples]
        what = "question + the sentence of its paragraph that holds the answer"
    return ([json.dumps(r).encode() for r in records],
            f"{what}, the first {len(examples)} questions of {path.name} (SQuAD v1.1 dev articles 32-39)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, batching: bool, max_batch_size: int, max_wait_ms: float, threads: int | None,
                 device: str = "cpu", precision: str | None = None, label: str | None = None):
        self.port = free_port()
        cmd = [sys.executable, "-m", "bertqa.serve", "--model-dir", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--no-access-log", "--log-level", "warning",
               "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms), "--device", device]
        if not batching:
            cmd.append("--no-batching")
        if threads:
            cmd += ["--num-threads", str(threads)]
        if precision:
            cmd += ["--precision", precision]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
        self.label = label or ("batching on" if batching else "batching off")

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server ({self.label}) exited with status {self.proc.returncode}")
            try:
                if get(self.port, "/ping")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stats(self) -> dict:
        return json.loads(get(self.port, "/stats")[1])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def load(port: int, bodies: list[bytes], concurrency: int, duration: float | None = None,
         total: int | None = None, offset: int = 0) -> dict:
    """Closed-loop clients until `duration` seconds have passed or `total` requests were answered."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    counter = iter(range(offset, 1 << 62))
    lock = threading.Lock()
    done = [0]
    stop = threading.Event()
    headers = {"Content-Type": "application/json"}

    def client(c: int) -> None:
        conn = None
        while not stop.is_set():
            with lock:
                if total is not None and done[0] >= total:
                    break
                done[0] += 1
                body = bodies[next(counter) % len(bodies)]
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                conn.request("POST", "/invocations", body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn = None
            latencies[c].append(time.perf_counter() - t0)
            errors[c] += not ok
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if duration is not None:
        stop.wait(duration)
        stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = np.array([x for per in latencies for x in per]) * 1000
    return {"requests": int(lat.size), "seconds": elapsed, "errors": int(sum(errors)),
            "qps": lat.size / elapsed, "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99))}


def measure(server: Server, bodies, concurrency: int, duration: float, offset: int) -> dict:
    before = server.stats()
    r = load(server.port, bodies, concurrency, duration=duration, offset=offset)
    after = server.stats()
    calls = after["engine_calls"] - before["engine_calls"]
    r["batch"] = (after["windows"] - before["windows"]) / calls if calls else 0.0
    return r


def merge(runs: list[dict]) -> dict:
    """Rounds of one cell: requests and time add up; percentiles are the mean of the rounds'."""
    n, secs = sum(r["requests"] for r in runs), sum(r["seconds"] for r in runs)
    out = {"requests": n, "seconds": secs, "qps": n / secs, "errors": sum(r["errors"] for r in runs)}
    for k in ("p50", "p95", "p99", "batch"):
        out[k] = float(np.mean([r[k] for r in runs]))
    return out


def mean_window_tokens(model: str, kinds: dict) -> dict[str, float]:
    """Mean tokens per window ([CLS] question [SEP] context [SEP], at most 384) of each request kind."""
    from bertqa.checkpoint import resolve_model
    from bertqa.tokenization import BertQATokenizer

    tok = BertQATokenizer.from_pretrained(resolve_model(model))
    out = {}
    for kind, (bodies, _) in kinds.items():
        records = [json.loads(b) for b in bodies[:500]]
        out[kind] = float(np.mean([min(384, len(tok.tokenize(r["question"])[:64]) + len(tok.tokenize(r["context"])) + 3)
                                   for r in records]))
    return out


def engine_scaling(model: str, lengths=(32, 64, 128, 192, 384), batches=(8, 16), reps: int = 5,
                   device: str = "cpu", precision: str | None = None) -> list[dict]:
    """The engine alone, in this process: windows/s at batch 1 and at each of `batches` for several window
    lengths (medians of reps alternating runs). How much dynamic batching can gain is bounded by these ratios."""
    from bertqa.model import BertQA

    m = BertQA.from_pretrained(model, device=device, precision=precision)
    rng = np.random.default_rng(0)
    m.forward(np.full((16, 384), 100, dtype=np.int32))
    rows = []
    for T in lengths:
        one = rng.integers(1000, 2000, (1, T)).astype(np.int32)
        t1, tb = [], {b: [] for b in batches}
        for _ in range(reps):
            for b in batches:
                many = rng.integers(1000, 2000, (b, T)).astype(np.int32)
                t = time.perf_counter()
                for _ in range(b):
                    m.forward(one)
                t1.append((time.perf_counter() - t) / b)
                t = time.perf_counter()
                m.forward(many)
                tb[b].append(time.perf_counter() - t)
        rows.append({"T": T, "one": 1 / float(np.median(t1)), **{b: b / float(np.median(tb[b])) for b in batches}})
        print(f"engine T={T}: {rows[-1]['one']:.1f} windows/s at batch 1, "
              + ", ".join(f"{rows[-1][b]:.1f} at batch {b}" for b in batches), flush=True)
    del m
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--payload", nargs="+", default=["short", "squad"], choices=["short", "squad"],
                    help="request kinds, each measured at every concurrency (RSS phase: the first)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per cell and round")
    ap.add_argument("--repeats", type=int, default=2, help="rounds (on/off alternate, order flipped each round)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the servers' engine device")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16", "int8"],
                    help="the servers' precision (bertqa serve --precision; default: the device's)")
    ap.add_argument("--versus-precision", default=None, choices=["fp32", "bf16", "int8"],
                    help="compare two batching servers, --precision against this one, instead of batching on/off")
    ap.add_argument("--rss-requests", type=int, default=10000, help="0: skip the memory phase")
    ap.add_argument("--output", default=None, help="also write the Markdown report here")
    ap.add_argument("--no-engine-scaling", dest="engine_scaling", action="store_false",
                    help="skip the in-process engine measurement (batch 1 vs 8)")
    args = ap.parse_args()

    scaling = engine_scaling(args.model, device=args.device, precision=args.precision) if args.engine_scaling else None

    kinds = {k: payloads(k) for k in args.payload}
    window_tokens = mean_window_tokens(args.model, kinds)
    versus = args.versus_precision is not None
    first = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    labels = {True: first, False: args.versus_precision} if versus else {True: "on", False: "off"}
    column = "precision" if versus else "batching"
    servers = {b: Server(args.model, True if versus else b, args.max_batch_size, args.max_wait_ms, args.threads,
                         args.device, args.versus_precision if versus and not b else args.precision,
                         f"precision {labels[b]}" if versus else None)
               for b in (True, False)}
    cells: dict[tuple[str, bool, int], list[dict]] = {}
    memory = None
    try:
        for s in servers.values():
            s.wait_ready()
        rss_warm = servers[True].rss_mb()
        offset = 0
        for rnd in range(args.repeats):
            for kind, (bodies, _) in kinds.items():
                for c in args.concurrency:
                    order = (True, False) if rnd % 2 == 0 else (False, True)
                    for b in order:
                        r = measure(servers[b], bodies, c, args.duration, offset)
                        offset += r["requests"]
                        cells.setdefault((kind, b, c), []).append(r)
                        print(f"round {rnd + 1} {kind:5s} {column} {labels[b]:4s} c={c:<3d} "
                              f"{r['qps']:7.2f} QPS  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  "
                              f"errors {r['errors']}  batch {r['batch']:.2f}", flush=True)
        if args.rss_requests > 100:
            # Memory over many requests, on the (first) batching server at the highest concurrency.
            rss_c, on = max(args.concurrency), servers[True]
            bodies = kinds[args.payload[0]][0]
            first = load(on.port, bodies, rss_c, total=100, offset=0)
            rss_100 = on.rss_mb()
            rest = load(on.port, bodies, rss_c, total=args.rss_requests - 100, offset=100)
            rss_n = on.rss_mb()
            memory = (rss_c, rss_warm, rss_100, rss_n, first["errors"] + rest["errors"], rest["qps"])
            print(f"RSS: {rss_warm:.1f} MB after warm-up, {rss_100:.1f} MB after 100 requests, {rss_n:.1f} MB after "
                  f"{args.rss_requests} ({memory[4]} errors, {rest['qps']:.1f} QPS)", flush=True)
    finally:
        for s in servers.values():
            s.stop()

    results = {k: merge(v) for k, v in cells.items()}
    lines = [
        f"Command: `python bench/serve_load.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Model {args.model} on {os.cpu_count()} cores ({platform.machine()}), engine device {args.device}, "
        f"Python {platform.python_version()}, "
        f"one server process per mode, both loaded side by side and measured alternately; closed-loop clients "
        f"with keep-alive connections, {args.duration:g} s per cell x {args.repeats} rounds (QPS over all rounds, "
        f"latency percentiles averaged over rounds). Batching on: at most {args.max_batch_size} windows per batch, "
        f"max wait {args.max_wait_ms:g} ms, one engine call per batch (the CPU engine packs the windows without "
        f"padding); off: one engine call per request. \"engine batch\" = windows per engine call (GET /stats).",
    ]
    if versus:
        lines += ["", f"Both servers batch; they differ in precision: {labels[True]} against {labels[False]} "
                      f"(`bertqa serve --precision`). The ratio is {labels[False]}'s QPS over {labels[True]}'s."]
    else:
        lines += ["", f"Both servers run in precision {first}."]
    for kind, (_, source) in kinds.items():
        lines += ["", f"Requests \"{kind}\": {source}; {window_tokens[kind]:.0f} tokens per window on average.", "",
                  f"| clients | {column} | QPS | p50 ms | p95 ms | p99 ms | p99/p50 | errors | engine batch "
                  + (f"| QPS {labels[False]}/{labels[True]} |" if versus else "| QPS on/off |"),
                  "| ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c in args.concurrency:
            for b in (True, False):
                r = results[(kind, b, c)]
                on, off = results[(kind, True, c)]["qps"], results[(kind, False, c)]["qps"]
                ratio = (f"{off / on:.2f}x" if versus else f"{on / off:.2f}x") if (b != versus) else ""
                lines.append(f"| {c} | {labels[b]} | {r['qps']:.2f} | {r['p50']:.0f} | {r['p95']:.0f} | "
                             f"{r['p99']:.0f} | {r['p99'] / r['p50']:.2f} | {r['errors']} | {r['batch']:.2f} | "
                             f"{ratio} |")
    if scaling:
        bs = [k for k in scaling[0] if isinstance(k, int)]
        lines += ["", "The engine alone (in-process, no server): windows per second at batch 1 and larger batches, per "
                      "window length; dynamic batching cannot raise throughput by more than these ratios.", "",
                  "| window tokens | batch 1 | " + " | ".join(f"batch {b} | ratio" for b in bs) + " |",
                  "| ---: | ---: |" + " ---: | ---: |" * len(bs)]
        lines += [f"| {r['T']} | {r['one']:.1f} | " + " | ".join(f"{r[b]:.1f} | {r[b] / r['one']:.2f}x" for b in bs)
                  + " |" for r in scaling]
    if memory is not None:
        rss_c, rss_warm, rss_100, rss_n, errors, qps = memory
        lines += ["", f"Resident memory of the {servers[True].label} server ({args.payload[0]} requests, "
                      f"concurrency {rss_c}): "
                      f"{rss_warm:.1f} MB after warm-up, {rss_100:.1f} MB after the first 100 requests, "
                      f"{rss_n:.1f} MB after {args.rss_requests:,} requests ({100 * (rss_n / rss_100 - 1):+.1f}%); "
                      f"{errors} errors; {qps:.1f} QPS over that run."]
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.output:
        Path(args.output).write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
