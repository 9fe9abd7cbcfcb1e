#!/usr/bin/env bash
# The pack's GPU benchmarks in ONE device call. On the device, from the repository root:
#     bash bench/device/run.sh            (device tool: carry [".whl"], timeout_s ~540)
# after `bash bench/device/prepare.sh` filled .whl/ here. Everything is also written to $OUT/bench.log
# (OUT defaults to ./device-out). Each bench runs under `timeout`, a failed one is recorded and the next one
# still runs; the exit status is non-zero when any step failed. The whole script stays under ~8 minutes.
#
# Without CUDA it refuses, unless SEFI_DEVICE_SMOKE=1: then the same steps run with tiny arguments on the CPU
# (how the kit is tested off the device; see bench/device/emulate.sh).
#
# Environment: PYTHON (default python3), OUT, SEFI_DEVICE_WHEELS (default .whl), SEFI_DEVICE_SITE (default
# /tmp/site), SEFI_DEVICE_SMOKE, SEFI_DEVICE_BUDGET_S (default 460 s: the benches together never run past it).
set -u -o pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-./device-out}
WHEELS=${SEFI_DEVICE_WHEELS:-.whl}
SITE=${SEFI_DEVICE_SITE:-/tmp/site}
SMOKE=${SEFI_DEVICE_SMOKE:-0}
BUDGET_S=${SEFI_DEVICE_BUDGET_S:-460}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG=$OUT/bench.log

FAILED=()
SUMMARY=""
BENCH_START=$SECONDS
KEY_LINES="^(host:|TI |SeFi |ratio|batch |identity:|plain CLIPTextEncode|SeFiApplyIdentity +:|one-time)"

# bench LABEL CAP_S MODULE ARGS...: run one bench module under min(CAP_S, what is left of the budget). The benches
# boot the host with device="auto", so they use the GPU when there is one.
bench() {
  local label=$1 cap=$2; shift 2
  local left=$(( BUDGET_S - (SECONDS - BENCH_START) ))
  local limit=$(( cap < left ? cap : left ))
  echo
  echo "=== $label: $* (timeout ${limit} s) ==="
  if (( limit < 20 )); then
    echo "--- $label: SKIPPED (only ${limit} s left of the ${BUDGET_S} s budget)"; FAILED+=("$label (skipped)")
    SUMMARY+="--- $label: $*: SKIPPED"$'\n'; return
  fi
  local t0=$SECONDS rc tmp
  tmp=$(mktemp)
  timeout -k 10 "$limit" "$PYTHON" -m "$@" 2>&1 | tee "$tmp"
  rc=${PIPESTATUS[0]}
  if (( rc == 0 )) && [[ $SMOKE != 1 ]] && grep -q -E "device cpu|device: cpu" "$tmp"; then
    echo "--- $label: ran on the CPU although CUDA is present"; rc=99
  fi
  local status
  if (( rc == 0 )); then status="ok in $(( SECONDS - t0 )) s"
  elif (( rc == 124 || rc == 137 )); then status="TIMED OUT after ${limit} s"; FAILED+=("$label (timeout ${limit} s)")
  else status="FAILED (exit $rc) after $(( SECONDS - t0 )) s"; FAILED+=("$label (exit $rc)"); fi
  echo "--- $label: $status"
  SUMMARY+="--- $label: $*: $status"$'\n'
  local keys; keys=$(grep -E "$KEY_LINES" "$tmp") && SUMMARY+="$keys"$'\n'
  rm -f "$tmp"
}

main() {
  local rev="(no git)" r
  if r=$(git rev-parse --short HEAD 2>/dev/null); then rev=$r; git diff --quiet HEAD 2>/dev/null || rev+=" + uncommitted changes"; fi
  echo "=== sefi device bench: $(date -u +%FT%TZ), repo $rev, smoke=$SMOKE"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi

  # 1. The carried wheels into a target folder that comes first on sys.path (it shadows the device's own
  #    transformers 5, tokenizers and huggingface_hub).
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  if (( ${#wheels[@]} == 0 )); then echo "no wheels in $WHEELS: run bash bench/device/prepare.sh first (and carry .whl)"; return 2; fi
  local t0=$SECONDS
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" 2>&1 | { grep -v -E "already exists|Target directory" || true; }
  (( PIPESTATUS[0] == 0 )) || { echo "pip install of the kit failed"; return 2; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  echo "installed ${#wheels[@]} wheels into $SITE in $(( SECONDS - t0 )) s"

  # 2. What the benches will import: fail here, early, if the kit does not shadow the device's packages.
  "$PYTHON" - "$SITE" "$SMOKE" <<'PY' || { echo "environment check failed"; return 2; }
import os, platform, sys
site, smoke = os.path.realpath(sys.argv[1]), sys.argv[2] == "1"
import host_boot.torchvision_shim  # noqa: F401  (as the benches do; a no-op where torchvision's own ops load)
import torch, torchvision, numpy
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, numpy {numpy.__version__}; "
      f"CUDA {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NOT available'}")
bad = []
for name in ("transformers", "tokenizers", "huggingface_hub", "comfy"):
    mod = __import__(name)
    where = os.path.realpath(mod.__file__)
    version = getattr(mod, "__version__", "?")
    print(f"  {name:16s} {version:10s} {where}")
    if not where.startswith(site + os.sep):
        bad.append(f"{name} comes from {where}, not from {site}")
import transformers
if not transformers.__version__.startswith("4."):
    bad.append(f"transformers {transformers.__version__}: comfy.sd1_clip needs 4.x")
import comfy.sd1_clip  # noqa: F401  (the import that transformers 5 breaks)
if not torch.cuda.is_available() and not smoke:
    bad.append("no CUDA here: run with SEFI_DEVICE_SMOKE=1 for the CPU smoke test")
if bad:
    sys.exit("\n".join(bad))
PY

  # 3. The benches (goals: SeFi step <= 45 ms and SeFi/TI <= 1.15 at batch 1 on the full SD1.5 UNet at 512 px,
  #    peak <= 4 GiB, a 600-step identity <= 20 s; sampling with the identity <= 1.03 x plain).
  BENCH_START=$SECONDS
  #    Order: what the goals need first (eager and the loop's sync path side by side, then a default identity), then
  #    compile with the batch-size sweep (the longest: one compile per batch size), fp16, sampling.
  if [[ $SMOKE == 1 ]]; then
    bench train_step 300 bench.train_step --steps 1 --modes eager,sync --identity 2
    bench train_step_compile 300 bench.train_step --steps 1 --modes compile --batch-sizes 1,2
    bench train_step_fp16 300 bench.train_step --steps 1 --precision fp16 --modes eager,sync
    bench apply_identity 300 bench.apply_identity --steps 2 --repeats 1
  else
    bench train_step 150 bench.train_step --full-sd15 --resolution 512 --steps 20 --modes eager,sync --identity 600
    bench train_step_compile 190 bench.train_step --full-sd15 --resolution 512 --steps 20 --modes compile \
      --batch-sizes 1,2,4
    bench train_step_fp16 70 bench.train_step --full-sd15 --resolution 512 --steps 20 --precision fp16 \
      --modes eager,sync
    bench apply_identity 50 bench.apply_identity --size 512 --steps 20
  fi

  echo
  echo "=== summary ($(( SECONDS - BENCH_START )) s of benches; log: $LOG)"
  printf '%s' "$SUMMARY"
  if (( ${#FAILED[@]} )); then printf 'FAILED: %s\n' "${FAILED[@]}"; return 1; fi
  echo "all benches ran"
}

: >"$LOG"
main > >(tee -a "$LOG") 2>&1
rc=$?
sleep 1  # let tee drain
exit $rc
