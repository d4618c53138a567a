#!/usr/bin/env bash
# The README's quick start: `bash run.sh demo` or `bash run.sh test`.
# Creates .venv (Python >= 3.10), installs TensorFlow and this package
# (compiling the custom op against that TensorFlow), then runs the job.
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-}"
case "$job" in
  demo|test) shift ;;
  *) echo "usage: bash run.sh demo [demo options] | test [pytest options]" >&2
     exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install "setuptools>=68" wheel "tensorflow>=2.21,<2.22"
# --no-build-isolation: the op must be built against the TensorFlow above.
pip install --no-build-isolation -e ".[test,bench]"
if [ "$job" = demo ]; then
  exec .venv/bin/keras-antman demo "$@"
fi
exec .venv/bin/python -m pytest "$@"
