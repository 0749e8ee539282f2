#!/usr/bin/env bash
# The main job on embedded defaults: `dccl simulate` — the whole device-cloud loop over MQTT on this
# machine (an embedded Mosquitto, torch-free agent processes hosting 200 virtual devices on the
# built-in synthetic data, ingest into SQLite, MoMoDistill, 2 rounds), written to runs/demo/
# (report.md with tables and plots, results.json). Extra arguments go to `dccl simulate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/dccl simulate --out runs/demo "$@"
