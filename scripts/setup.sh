#!/usr/bin/env bash
# Set up a virtual environment in .venv with monet-lm, its optional extras and the test tools.
# torch is installed first, pinned to 2.13.0 (the CPU wheel these machines carry); elsewhere install any
# torch build you like into .venv before running this: the pin is skipped when a torch is already present.
# As root on Debian, it also installs Chromium for the viewer's browser test (skipped, with a reason, without it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[test,toxicity,eval,interp,vision,gpu]"
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
    || echo "note: could not install chromium; the viewer's browser test will be skipped"
fi
echo "monet-lm is installed in .venv (activate with: source .venv/bin/activate)"
