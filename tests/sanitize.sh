#!/usr/bin/env bash
# Runs the test suite against a build of bertqa._C instrumented with AddressSanitizer and
# UndefinedBehaviorSanitizer (BERTQA_SANITIZE=1). The instrumented build goes into a scratch copy of the
# package, so the normal build in the checkout is left as it is.
#   usage: tests/sanitize.sh [pytest options...]
#   the test files: $BERTQA_SANITIZE_TESTS (default: the kernel and engine tests)
set -euo pipefail
PY=${PYTHON:-python3}   # the interpreter whose numpy and scipy-openblas32 to build against
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$repo/csrc" "$repo/bertqa" "$repo/tests" "$repo/buildtools" "$repo/setup.py" "$repo/pyproject.toml" "$work/"
rm -f "$work"/bertqa/_C*.so
cd "$work"
BERTQA_SANITIZE=1 "$PY" setup.py -q build_ext --inplace >build.log 2>&1 || { cat build.log; exit 1; }
libasan=$(gcc -print-file-name=libasan.so)
# Python itself is not instrumented: preload the ASan runtime, and do not report the interpreter's
# intentional leaks at exit. Any error aborts the run with a report.
export LD_PRELOAD="$libasan" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1" \
       UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" BERTQA_DATA_DIR="${BERTQA_DATA_DIR:-$repo/../shared/data}"
# PYTHONPATH puts the instrumented copy ahead of any installed bertqa.
PYTHONPATH="$work" "$PY" - <<'PY'
import sys
from bertqa._core import _C
assert _C.__file__.startswith(sys.path[0]), f"not the instrumented build: {_C.__file__}"
print("sanitized build:", _C.__file__)
PY
tests=${BERTQA_SANITIZE_TESTS:-tests/test_ops.py tests/test_ops_errors.py tests/test_dropout.py tests/test_engine.py}
# BERTQA_IN_SANITIZER keeps tests/test_sanitizers.py from starting this script again from inside it
BERTQA_IN_SANITIZER=1 PYTHONPATH="$work" "$PY" -m pytest -q -p no:cacheprovider --ignore=tests/test_sanitizers.py \
    "$@" $(for t in $tests; do [ -e "$t" ] && echo "$t"; done)
