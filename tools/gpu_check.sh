#!/usr/bin/env bash
# Training speed on this machine's GPU, in at most 5 minutes: idc_net for 2 epochs over the training share of a
# full-size synthetic set (277,524 patches), at batch 128 and 512, with GPU utilisation sampled from nvidia-smi,
# beside the input pipeline's own rate; says whether the input pipeline sets the pace.
#
#   tools/gpu_check.sh [OUT_DIR] [extra options of `python -m idc_helpers.bench speed --gpu-check`]
#
# Results: OUT_DIR/gpu_check.md (a table), gpu_check.json, nvidia-smi.txt, log.txt. OUT_DIR defaults to $OUT
# (set on the project's device machines), else ./gpu-check. Tiny run for checking the script itself on a CPU:
#   tools/gpu_check.sh /tmp/gpu-check --patches 3000 --epochs 1 --batch-size 64 --pipeline-batches 5
set -euo pipefail

out="${1:-${OUT:-gpu-check}}"
shift || true
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: the benchmark below runs from the repository root
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
if [ -x "$here/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then python="$here/.venv/bin/python"; fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi not found: no NVIDIA GPU"; fi
} > "$out/nvidia-smi.txt" 2>&1

# The Python part stops itself well inside the 5 minutes: 270 s, then whatever it has written stays in $out.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
status=0
(cd "$here" && timeout 270 "$python" -m idc_helpers.bench speed --gpu-check --out "$out" "$@") \
  > >(tee "$out/log.txt") 2> >(tee -a "$out/log.txt" >&2) || status=$?
if [ "$status" -eq 124 ]; then echo "gpu_check: stopped after 270 s; partial log in $out/log.txt" >&2; fi
exit "$status"
