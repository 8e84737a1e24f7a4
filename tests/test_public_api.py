"""The public import surface: `from bertqa import BertQA, QAPipeline`, a cheap `import bertqa`, the serve package.

What `import bertqa` loads is checked in a fresh interpreter (this process has long imported everything).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bertqa

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = Path(bertqa.__file__).resolve().parents[1]  # the bertqa under test, for the child interpreters

# Heavy or optional: none of these may be loaded by a bare `import bertqa`.
NOT_IMPORTED = ["bertqa._C", "bertqa._core", "bertqa._cuda", "bertqa.cuda", "bertqa.model", "bertqa.inference",
                "bertqa.ops", "bertqa.serve", "bertqa.squad", "bertqa.tokenization", "bertqa.train", "numpy",
                "starlette", "uvicorn", "tokenizers"]


def run_python(*args: str) -> str:
    """stdout of `python ARGS` run with the bertqa under test first on the path; fails on a non-zero exit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bare_import_loads_no_extension_numpy_or_submodule():
    path, modules = json.loads(run_python("-c", "import bertqa, json, sys; "
                                                "print(json.dumps([bertqa.__file__, sorted(sys.modules)]))"))
    assert Path(path).resolve() == Path(bertqa.__file__).resolve()  # the child imported the bertqa under test
    loaded = [m for m in NOT_IMPORTED if m in modules]
    assert loaded == [], f"`import bertqa` imported {loaded}"
    assert "bertqa" in modules


def test_short_imports_resolve_lazily_to_the_defining_modules():
    out = run_python(
        "-c",
        "import sys, bertqa\n"
        "assert 'bertqa.model' not in sys.modules and 'bertqa.inference' not in sys.modules\n"
        "B = bertqa.BertQA\n"
        "import bertqa.model\n"
        "assert B is bertqa.model.BertQA\n"
        "assert 'bertqa.inference' not in sys.modules, 'BertQA pulled in the inference module'\n"
        "from bertqa import QAPipeline\n"
        "import bertqa.inference\n"
        "assert QAPipeline is bertqa.inference.QAPipeline\n"
        "print('ok')\n")
    assert out.strip() == "ok"
    from bertqa import BertQA, QAPipeline
    import bertqa.inference
    import bertqa.model

    assert BertQA is bertqa.model.BertQA and QAPipeline is bertqa.inference.QAPipeline


def test_unknown_names_raise_errors_that_name_them():
    with pytest.raises(AttributeError, match="module 'bertqa' has no attribute 'NoSuchThing'"):
        bertqa.NoSuchThing  # noqa: B018
    assert not hasattr(bertqa, "BertQa")  # the lazy names are exact
    with pytest.raises(ImportError, match="no_such_thing"):
        from bertqa import no_such_thing  # noqa: F401


def test_all_and_dir_list_the_public_names():
    assert set(bertqa.__all__) >= {"BertQA", "QAPipeline", "cuda_available", "__version__"}
    assert set(bertqa.__all__) <= set(dir(bertqa))
    for name in bertqa.__all__:
        assert getattr(bertqa, name) is not None
    namespace = {}
    exec("from bertqa import *", namespace)
    assert namespace["BertQA"] is bertqa.BertQA and namespace["QAPipeline"] is bertqa.QAPipeline


def test_cuda_available_answers_without_cuda_at_import():
    out = run_python("-c", "import sys, bertqa; r = bertqa.cuda_available(); "
                     "print(type(r).__name__, 'bertqa.cuda' in sys.modules)")
    assert out.split() == ["bool", "True"]  # the backend is loaded by the call, and only then


def test_serve_package_reexports_every_public_name():
    from bertqa import serve

    for name in serve.__all__:
        value = getattr(serve, name)
        home = getattr(value, "__module__", None)
        assert home is None or home.startswith("bertqa.serve."), (name, home)
    # the names today's callers import from bertqa.serve
    for name in ("ServeConfig", "RequestError", "parse_request", "request_format", "response_format",
                 "DynamicBatcher", "QAService", "create_app", "load_model", "run_server", "add_serve_parser",
                 "app_from_env", "openapi_spec", "INDEX_HTML"):
        assert name in serve.__all__, name
    assert serve.INDEX_HTML.startswith("<!doctype html>") and 'id="ask"' in serve.INDEX_HTML


def test_python_m_bertqa_serve_is_the_serve_command():
    out = run_python("-m", "bertqa.serve", "--help")  # what bench/serve_load.py and SageMaker-style images run
    assert out.startswith("usage: python -m bertqa.serve") and "--max-batch-size" in out


def test_the_wheel_carries_the_serve_package_and_its_page(tmp_path):
    """setup.py build_py copies what a wheel (and a regular pip install) gets: every package and its data. It runs
    on a clean copy of the sources: an egg-info left by an earlier build would supply a file list of its own."""
    src, lib = tmp_path / "src", tmp_path / "lib"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.egg-info", "build")
    shutil.copytree(REPO / "csrc", src / "csrc", ignore=skip)
    shutil.copytree(REPO / "buildtools", src / "buildtools", ignore=skip)
    shutil.copytree(REPO / "bertqa", src / "bertqa", ignore=skip)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=src,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, BERTQA_NO_CUDA="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sources = {p.relative_to(src).as_posix() for p in (src / "bertqa").rglob("*")
               if p.suffix in (".py", ".html") and "__pycache__" not in p.parts}
    built = {p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file()}
    assert {"bertqa/serve/index.html", "bertqa/serve/app.py"} <= sources
    assert sources <= built, f"missing from the wheel: {sorted(sources - built)}"
