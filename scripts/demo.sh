#!/usr/bin/env bash
# The main job on embedded defaults: the DCCL experiment on the built-in synthetic data (every strategy,
# 2 rounds, 3 seeds), written to runs/demo/ (results.md with tables and plots, results.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/dccl experiment --dataset synthetic --rounds 2 --seeds 3 --out runs/demo "$@"
