#!/usr/bin/env bash
# Run a jaxsft config on this machine's GPUs: one process drives every visible GPU.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: [VAR=value ...] launch/gpu_local.sh [STEP ...] [-- JAXSFT_RUN_FLAGS ...]

Steps (default: install run):
  install  create the venv and install jaxsft: over the jax that PYTHON has when it sees a GPU
           (JAX=system), else with jax[cuda12] (CUDA and cuDNN wheels)
  check    show the devices JAX sees
  run      python -m jaxsft.run on all visible GPUs (FSDP over them: the config's mesh.fsdp=-1)

Re-running `run` on the same WORKDIR resumes from its last checkpoint.

Variables (defaults in brackets):
  CONFIG                config file [configs/phi3_mini.py]
  WORKDIR               output directory [runs/<config name>]
  VENV                  virtualenv [.venv-gpu]
  PYTHON                interpreter that creates the venv (3.11+) [python3]
  JAX                   system: keep PYTHON's jax, jaxlib and CUDA plugin (a warning where jaxsft pins
                        another jax), and install into the venv what jaxsft lacks or needs newer,
                        leaving PYTHON's own packages untouched;
                        cuda12 | cuda13: a new venv with jax[cudaNN] at jaxsft's pin;
                        auto: system if PYTHON's jax sees a GPU, else cuda12 [auto]
  CUDA_VISIBLE_DEVICES  GPUs to use [all]
  MEM_FRACTION          share of each GPU's memory JAX preallocates [0.92]
  HF_TOKEN              Hugging Face token for gated models (Llama)

Offline: PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels launch/gpu_local.sh install

Example: CONFIG=configs/llama2_7b.py launch/gpu_local.sh run -- --config.train.learning_rate=2e-5
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=${CONFIG:-configs/phi3_mini.py}
WORKDIR=${WORKDIR:-runs/$(basename "${CONFIG}" .py)}
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
JAX=${JAX:-auto}
MEM_FRACTION=${MEM_FRACTION:-0.92}
if [[ "${VENV}" != /* ]]; then
    VENV="${REPO}/${VENV}"
fi

# Preallocate most of each GPU (JAX's default is 75%); overlap FSDP's all-gathers with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

py() {
    "${VENV}/bin/python" "$@"
}

step_install() {
    if ! command -v nvidia-smi > /dev/null; then
        echo "nvidia-smi not found: install the NVIDIA driver first" >&2
        exit 1
    fi
    if [[ "${JAX}" == auto ]]; then
        if "${PYTHON}" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2> /dev/null; then
            JAX=system
        else
            JAX=cuda12
        fi
    fi
    if [[ "${JAX}" == system ]]; then
        install_over_system
    else
        "${PYTHON}" -m venv "${VENV}"
        py -m pip install --quiet --upgrade pip
        py -m pip install --quiet -e "${REPO}" "jax[${JAX}]==$("${PYTHON}" "${REPO}/launch/requirements.py" pin jax)"
    fi
}

# A venv that sees PYTHON's packages (through a .pth, also when PYTHON is itself a venv's). PYTHON's
# jax, jaxlib and CUDA plugin stay (pinned by constraints); jaxsft's other requirements that are
# missing or too old are installed into the venv, shadowing PYTHON's copies without touching them;
# the checkout goes on the path (no build step, so it works offline).
install_over_system() {
    echo "using $("${PYTHON}" -c 'import jax; print("jax", jax.__version__, "on", jax.devices())')"
    "${PYTHON}" -m venv --system-site-packages --without-pip "${VENV}"  # PYTHON's pip serves it
    local site constraints="${VENV}/jax-constraints.txt" wanted
    site=$(py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "${PYTHON}" -c 'import sysconfig; print(*dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")), sep="\n")' \
        > "${site}/system-site-packages.pth"
    echo "${REPO}" > "${site}/jaxsft.pth"
    wanted=$(py "${REPO}/launch/requirements.py" plan "${constraints}")
    if [[ -n "${wanted}" ]]; then
        echo "installing:" ${wanted}
        # shellcheck disable=SC2086 (one requirement per word)
        "${PYTHON}" -m pip --python "${VENV}/bin/python" install --quiet -c "${constraints}" ${wanted}
    fi
}

step_check() {
    py -c 'import jax; print(jax.default_backend(), jax.devices())'
}

step_run() {
    if [[ "$(py -c 'import jax; print(jax.default_backend())')" != gpu ]]; then
        echo "JAX sees no GPU (run: launch/gpu_local.sh install check)" >&2
        exit 1
    fi
    cd "${REPO}"
    py -m jaxsft.run --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
}

main() {
    local steps=() extra=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --) shift; extra=("$@"); break ;;
            -h | --help | help) usage; exit 0 ;;
            install | check | run) steps+=("$1"); shift ;;
            *) echo "unknown step $1" >&2; usage >&2; exit 2 ;;
        esac
    done
    if [[ ${#steps[@]} -eq 0 ]]; then
        steps=(install run)
    fi
    for s in "${steps[@]}"; do
        if [[ "${s}" == run ]]; then
            step_run "${extra[@]}"
        else
            "step_${s}"
        fi
    done
}

main "$@"
