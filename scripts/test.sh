#!/usr/bin/env bash
# Install into .venv (first run only) and run the whole test suite on the CPU. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` or `bash scripts/test.sh tests/test_model.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
want=$(cat requirements.txt requirements-test.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.requirements-test.sha256 2>/dev/null)" != "$want" ]; then
  echo "installing requirements-test.txt into .venv ..."
  python -m pip install -q -r requirements-test.txt -c requirements.txt
  echo "$want" > .venv/.requirements-test.sha256
fi
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
