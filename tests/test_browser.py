"""The question-answering page at `/` in a real browser: headless Chromium, driven by selenium through
chromedriver, against a real `python -m bertqa serve` subprocess on a free 127.0.0.1 port.

The model is a fixture built to answer: a tiny BERT whose encoder layers add nothing (their output projections
are zero, so each layer is LayerNorm of its input) and whose QA head reads two embedding directions that only the
tokens "gustave" (start) and "eiffel" (end) carry. Any context with one "Gustave Eiffel" in it is answered
"Gustave Eiffel" with score ~1, by construction rather than by understanding; that gives the page a known right
span to highlight. The page's highlight is also compared with what POST /invocations returns for the same request.

Chromium and chromedriver: Debian's `chromium` and `chromium-driver`. When they are missing, the session fixture
installs them with apt-get if it runs as root on Debian (not when BERTQA_NO_BROWSER_INSTALL=1), and otherwise the
tests skip with a reason that names what is missing and the command that installs it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qa_helpers import free_port, http_call, write_answering_model

REPO = Path(__file__).resolve().parents[1]
INSTALL_CMD = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
INSTALL_TIMEOUT_S = 900
WAIT_S = 30  # any single wait in the browser (page load, answer, error)
# copies to look at after a run (the tests' own screenshots are in tmp_path)
SCREENSHOT_COPIES = {"answer.png": Path("/tmp/bertqa-page.png"), "error.png": Path("/tmp/bertqa-page-error.png")}

CONTEXT = "In 1889 the engineer Gustave Eiffel finished a tower for the world fair in Paris."
QUESTION = "Who finished the tower?"


# ---- chromium + chromedriver -------------------------------------------------------------------------------------


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _find_browser() -> tuple[str | None, str | None]:
    chromium = _find("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    driver = _find("chromedriver") or next((p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
                                            if os.access(p, os.X_OK)), None)
    return chromium, driver


def _apt_install() -> str:
    """Installs chromium + chromium-driver; '' on success, else what went wrong (for the skip reason)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def run(cmd):
        try:
            r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=INSTALL_TIMEOUT_S, text=True)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` ran over {INSTALL_TIMEOUT_S} s"
        return "" if r.returncode == 0 else f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stdout[-800:]}"

    start = time.monotonic()
    error = run(INSTALL_CMD)
    if error:  # package lists absent or stale (404s): refresh them once and try again
        error = run(["apt-get", "update"]) or run(INSTALL_CMD)
    print(f"apt-get install chromium chromium-driver: {time.monotonic() - start:.0f} s"
          + (f", {error}" if error else ""), file=sys.stderr)
    return error


@pytest.fixture(scope="session")
def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), installing them with apt-get when that is possible and allowed; else skip."""
    pytest.importorskip("selenium", reason="selenium is not installed: pip install selenium (in the test extra)")
    chromium, driver = _find_browser()
    if chromium and driver:
        return chromium, driver
    missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver)) if not p)
    how = "apt-get install -y --no-install-recommends chromium chromium-driver"
    if os.environ.get("BERTQA_NO_BROWSER_INSTALL") == "1":
        pytest.skip(f"{missing} not found and BERTQA_NO_BROWSER_INSTALL=1; install with: {how}")
    if not (Path("/etc/debian_version").exists() and shutil.which("apt-get")):
        pytest.skip(f"{missing} not found (not Debian with apt-get); install Chromium and a matching chromedriver "
                    f"(on Debian: {how})")
    if os.geteuid() != 0:
        pytest.skip(f"{missing} not found and not root, so not installing; install with: sudo {how}")
    error = _apt_install()
    chromium, driver = _find_browser()
    if not (chromium and driver):
        pytest.skip(f"{missing} not found and installing failed: {error or 'installed, but still not on PATH'}")
    return chromium, driver


@pytest.fixture
def browser(browser_paths):
    """Headless Chromium at a fixed window size; quit (and chromedriver killed if it lingers) in all cases."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--window-size=1000,800", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--lang=en-US"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to start its sandbox as root
    service = Service(executable_path=chromedriver)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(WAIT_S)
        driver.set_script_timeout(WAIT_S)
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.quit()
        proc = getattr(service, "process", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---- a model that answers, and a real server -----------------------------------------------------------------


def invoke(port: int, record: dict) -> tuple[int, dict]:
    """POST /invocations with one JSON record: (status, decoded JSON body)."""
    status, raw = http_call(port, "POST", "/invocations", json.dumps(record).encode())
    return status, json.loads(raw)


@pytest.fixture(scope="module")
def server_port(tmp_path_factory):
    """`python -m bertqa serve` on the answering model, ready (GET /ping 200); terminated, then killed if need be."""
    model = write_answering_model(tmp_path_factory.mktemp("answering_model"))
    port = free_port()
    log = open(tmp_path_factory.mktemp("server_log") / "serve.log", "w+b")
    proc = subprocess.Popen([sys.executable, "-m", "bertqa", "serve", "--model-dir", str(model), "--host",
                             "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"bertqa serve exited with {proc.returncode}: {log.read().decode()[-2000:]}")
            with contextlib.suppress(OSError):
                if http_call(port, "GET", "/ping", timeout=2)[0] == 200:
                    break
            assert time.monotonic() < deadline, "bertqa serve did not answer GET /ping within 60 s"
            time.sleep(0.1)
        yield port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


# ---- the page ------------------------------------------------------------------------------------------------


def open_page(driver, port: int):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"http://127.0.0.1:{port}/")
    WebDriverWait(driver, WAIT_S).until(EC.element_to_be_clickable((By.ID, "ask")))
    return {name: driver.find_element(By.ID, name) for name in ("context", "question", "ask", "out")}


def type_into(element, text: str) -> None:
    element.clear()
    element.send_keys(text)
    assert element.get_attribute("value") == text


def wait_for_out(driver, out, done) -> str:
    """Waits until #out's text satisfies done (it reads "..." while the request is in flight); returns it."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(lambda _: done(out.text))
    return out.text


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "the browser took no screenshot"
    assert path.stat().st_size > 1000
    with contextlib.suppress(OSError):
        shutil.copyfile(path, SCREENSHOT_COPIES[name])
    return path


def test_asking_highlights_the_answer_span_in_the_context(server_port, browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = open_page(browser, server_port)
    type_into(page["context"], CONTEXT)  # not the page's own example, so the answer shows the typing took effect
    type_into(page["question"], QUESTION)
    page["ask"].click()
    wait_for_out(browser, page["out"], lambda text: "Gustave" in text or text.startswith("Error"))

    marks = page["out"].find_elements(By.TAG_NAME, "mark")
    assert [m.text for m in marks] == ["Gustave Eiffel"], page["out"].text
    # the highlight sits in the context where the answer is, and the bold answer above it agrees
    paragraph = page["out"].find_element(By.TAG_NAME, "p")
    assert paragraph.text == CONTEXT
    assert browser.execute_script(
        "const p = arguments[0], m = p.querySelector('mark'), r = document.createRange();"
        "r.setStart(p, 0); r.setEndBefore(m); return r.toString().length;", paragraph) == CONTEXT.index("Gustave")
    assert page["out"].find_element(By.TAG_NAME, "b").text == "Gustave Eiffel"
    # and it is what the JSON API answers for the same request
    status, api = invoke(server_port, {"question": QUESTION, "context": CONTEXT})
    assert status == 200 and api["answer"] == "Gustave Eiffel", api
    assert CONTEXT[api["start"]:api["end"]] == marks[0].text
    assert f"(score {api['score']:.3f})" in page["out"].text
    screenshot(browser, tmp_path, "answer.png")


def test_empty_question_shows_the_servers_error(server_port, browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = open_page(browser, server_port)
    page["question"].clear()
    assert page["question"].get_attribute("value") == ""
    page["ask"].click()
    shown = wait_for_out(browser, page["out"], lambda text: text.startswith("Error"))

    context = page["context"].get_attribute("value")
    status, err = invoke(server_port, {"question": "", "context": context})
    assert status == 400 and err["error"], err
    assert shown == f"Error {status}: {err['error']}"
    assert "question" in shown.lower()
    assert not page["out"].find_elements(By.TAG_NAME, "mark")
    screenshot(browser, tmp_path, "error.png")


def test_highlight_is_right_after_characters_outside_the_bmp(server_port, browser):
    # The server's offsets count code points (Python str indices); JavaScript strings count UTF-16 units, so an
    # emoji before the answer would shift a highlight computed with context.slice(start, end).
    from selenium.webdriver.common.by import By

    context = "\U0001F5FC\U0001F1EB\U0001F1F7 " + CONTEXT
    page = open_page(browser, server_port)
    # chromedriver's send_keys types only characters of the Basic Multilingual Plane; set the value instead
    browser.execute_script("arguments[0].value = arguments[1];", page["context"], context)
    type_into(page["question"], QUESTION)
    page["ask"].click()
    wait_for_out(browser, page["out"], lambda text: "Gustave" in text or text.startswith("Error"))
    status, api = invoke(server_port, {"question": QUESTION, "context": context})
    assert status == 200 and api["answer"] == "Gustave Eiffel", api
    assert [m.text for m in page["out"].find_elements(By.TAG_NAME, "mark")] == ["Gustave Eiffel"]
    assert page["out"].find_element(By.TAG_NAME, "p").text == context
