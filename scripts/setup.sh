#!/usr/bin/env bash
# Set up a virtual environment in .venv with monet-lm and its test tools.
# torch is installed first, pinned to 2.13.0 (the CPU wheel these machines carry); elsewhere install any
# torch build you like before running this, and the pin is skipped when a torch is already present.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[test]"
echo "monet-lm is installed in .venv (activate with: source .venv/bin/activate)"
