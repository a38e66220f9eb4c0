#!/usr/bin/env bash
# Run a jaxsft config on a Cloud TPU VM or pod slice.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: WORKDIR=gs://BUCKET/PATH [VAR=value ...] launch/tpu_vm.sh [STEP ...]

Steps (default: create install run):
  check    compile the config for the slice here, ahead of time: fails fast if it does not fit
           (needs jax[tpu] locally; no TPU, no weights)
  create   create the TPU VM or pod slice, or reuse it if it exists (a preempted one is recreated)
  install  copy this checkout (git HEAD) to every worker and install it with the tpu extra
  run      run `python -m jaxsft.run` on all workers at once, detached; output in ~/jaxsft.log
  logs     follow ~/jaxsft.log on worker 0
  stop     stop the run on every worker (SIGTERM: the trainer checkpoints and exits)
  delete   delete the TPU VM

Re-running `run` on the same WORKDIR resumes from its last checkpoint: after a preemption,
`launch/tpu_vm.sh create install run` brings the slice back and goes on.

Variables (defaults in brackets):
  WORKDIR       gs:// path for checkpoints and results (required for run)
  CONFIG        config file [configs/llama2_7b.py]
  ACCELERATOR   Cloud TPU accelerator type: v5litepod-8, v4-8, v5p-8, v6e-8, ... [v5litepod-8]
  TPU_NAME      [jaxsft-$ACCELERATOR]
  ZONE          [a zone that offers the chip: us-west4-a (v5e), us-central2-b (v4), us-east5-a (v5p),
                 us-east5-b (v6e)]
  PROJECT       [gcloud's default project]
  VERSION       TPU software version [per chip: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e),
                 v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)]
  SPOT          1: create a Spot slice (cheaper, preemptible) [0]
  PYTHON        Python version of the workers' venv [3.11]
  EXTRA_ARGS    more flags for jaxsft.run, e.g. "--config.train.learning_rate=2e-5" []
  HF_TOKEN      Hugging Face token for gated models (Llama); passed to the workers, never echoed

On the workers nothing else is set: gcsfs (results, models in a bucket), tensorstore (orbax
checkpoints) and google-cloud-storage (TensorBoard) all take the VM's service account from the
metadata server. That account needs read and write access to WORKDIR's bucket. CONFIG's model.path
may be a gs:// HF directory or .gguf too: weights are read by byte ranges, never copied to disk.
EOF
}

CONFIG=${CONFIG:-configs/llama2_7b.py}
ACCELERATOR=${ACCELERATOR:-v5litepod-8}
TPU_NAME=${TPU_NAME:-jaxsft-${ACCELERATOR}}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}
SPOT=${SPOT:-0}
PYTHON=${PYTHON:-3.11}
EXTRA_ARGS=${EXTRA_ARGS:-}
WORKDIR=${WORKDIR:-}

case "${ACCELERATOR}" in
    v4-*) DEFAULT_ZONE=us-central2-b; DEFAULT_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) DEFAULT_ZONE=us-west4-a; DEFAULT_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) DEFAULT_ZONE=us-east5-a; DEFAULT_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) DEFAULT_ZONE=us-east5-b; DEFAULT_VERSION=v2-alpha-tpuv6e ;;
    *) echo "unknown ACCELERATOR ${ACCELERATOR}" >&2; usage >&2; exit 2 ;;
esac
ZONE=${ZONE:-${DEFAULT_ZONE}}
VERSION=${VERSION:-${DEFAULT_VERSION}}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPU=(compute tpus tpu-vm)
WHERE=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then
    WHERE+=(--project="${PROJECT}")
fi

on_workers() {  # run a shell command on every worker of the slice
    gcloud "${TPU[@]}" ssh "${TPU_NAME}" "${WHERE[@]}" --worker=all --command="$1"
}

state() {
    gcloud "${TPU[@]}" describe "${TPU_NAME}" "${WHERE[@]}" --format='value(state)' 2>/dev/null || true
}

step_check() {
    (cd "${REPO}" && JAX_PLATFORMS=cpu python -m jaxsft.compile --config="${CONFIG}" --topology="${ACCELERATOR}")
}

step_create() {
    local current
    current=$(state)
    if [[ "${current}" == "PREEMPTED" || "${current}" == "TERMINATED" ]]; then
        echo "${TPU_NAME} is ${current}: deleting it to create it again"
        gcloud "${TPU[@]}" delete "${TPU_NAME}" "${WHERE[@]}" --quiet
        current=""
    fi
    if [[ -n "${current}" ]]; then
        echo "reusing ${TPU_NAME} (${current})"
        return
    fi
    local flags=(--accelerator-type="${ACCELERATOR}" --version="${VERSION}")
    if [[ "${SPOT}" == 1 ]]; then
        flags+=(--spot)
    fi
    gcloud "${TPU[@]}" create "${TPU_NAME}" "${WHERE[@]}" "${flags[@]}"
}

step_install() {
    local archive
    archive=$(mktemp -t jaxsft-XXXXXX.tar.gz)
    git -C "${REPO}" archive --format=tar.gz -o "${archive}" HEAD
    gcloud "${TPU[@]}" scp "${archive}" "${TPU_NAME}:jaxsft.tar.gz" "${WHERE[@]}" --worker=all
    rm -f "${archive}"
    # TPU VM images ship an older Python: uv brings the one jaxsft needs.
    on_workers "set -e
        rm -rf ~/jaxsft && mkdir -p ~/jaxsft && tar xzf ~/jaxsft.tar.gz -C ~/jaxsft
        python3 -m pip install --quiet --user --upgrade uv
        ~/.local/bin/uv venv --quiet --allow-existing --python ${PYTHON} ~/venv
        ~/.local/bin/uv pip install --quiet --python ~/venv/bin/python -e \"\$HOME/jaxsft[tpu]\"
        ~/venv/bin/python -c 'import jax, jaxsft; print(\"jax\", jax.__version__, \"ready\")'"
}

step_run() {
    if [[ "${WORKDIR}" != gs://* ]]; then
        echo "WORKDIR must be a gs:// path, shared by all workers and kept across preemptions" >&2
        exit 2
    fi
    # Every worker runs the same program; JAXSFT_DISTRIBUTED=1 makes it join the others first.
    local token=""
    if [[ -n "${HF_TOKEN:-}" ]]; then
        token="export HF_TOKEN=$(printf '%q' "${HF_TOKEN}");"
    fi
    on_workers "${token} cd ~/jaxsft && JAXSFT_DISTRIBUTED=1 nohup ~/venv/bin/python -m jaxsft.run \
        --config=${CONFIG} --workdir=${WORKDIR} ${EXTRA_ARGS} > ~/jaxsft.log 2>&1 < /dev/null & echo \$! > ~/jaxsft.pid"
    echo "started on every worker of ${TPU_NAME}; follow with: launch/tpu_vm.sh logs"
}

step_logs() {
    gcloud "${TPU[@]}" ssh "${TPU_NAME}" "${WHERE[@]}" --worker=0 --command="tail -n 200 -F ~/jaxsft.log"
}

step_stop() {
    on_workers "if [ -f ~/jaxsft.pid ]; then kill -TERM \$(cat ~/jaxsft.pid) 2>/dev/null || true; fi"
}

step_delete() {
    gcloud "${TPU[@]}" delete "${TPU_NAME}" "${WHERE[@]}" --quiet
}

main() {
    local steps=("$@")
    if [[ ${#steps[@]} -eq 0 ]]; then
        steps=(create install run)
    fi
    for s in "${steps[@]}"; do
        case "${s}" in
            check | create | install | run | logs | stop | delete) "step_${s}" ;;
            -h | --help | help) usage; exit 0 ;;
            *) echo "unknown step ${s}" >&2; usage >&2; exit 2 ;;
        esac
    done
}

main "$@"
