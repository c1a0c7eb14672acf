# Sourced by the other scripts: make (once) and activate a virtual environment in .venv with requirements.txt.
# A stamp of requirements.txt inside .venv makes a second run skip the install.
set -euo pipefail
PY=${PYTHON:-python3}
$PY -c 'import sys; assert sys.version_info >= (3, 10), "arra needs Python 3.10 or newer"'
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv ..."
  $PY -m venv .venv
fi
. .venv/bin/activate
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$want" ]; then
  echo "installing requirements into .venv (torch is large: a few minutes the first time) ..."
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
  echo "$want" > .venv/.requirements.sha256
fi
