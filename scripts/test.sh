#!/usr/bin/env bash
# The whole test suite on a fresh Linux machine: installs what is missing, starts the local broker and
# database the tests use, then runs pytest from the cloud environment (edge tests spawn the torch-free
# edge environments as real subprocesses). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --for-tests
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
