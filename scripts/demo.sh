#!/usr/bin/env bash
# Quickstart, first command: install into .venv (first run only), then the whole shapes pipeline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
exec bash scripts/shapes_pipeline.sh
