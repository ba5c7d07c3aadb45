#!/usr/bin/env bash
# The device tool's one command for the GPU figures (README, "GPU figures"):
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=560, carry=[".whl"])
# Arguments pass through to benchmarks/gpu_check.py (--cpu-dry, --only, --budget, --out, ...);
# PYTHON picks the interpreter (the device image's python3 holds torch).
set -u
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
