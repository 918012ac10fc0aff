#!/usr/bin/env bash
# The project's checks, as CI runs them (.ci/run): lint, formatting, types of src/ (settings in pyproject.toml),
# then the default test suite. Stops at the first that fails. Needs the .venv that scripts/setup.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy src
.venv/bin/python -m pytest -q -m "not slow"
