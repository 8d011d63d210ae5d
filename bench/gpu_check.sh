#!/usr/bin/env bash
# One prepared GPU check (issues 7 and 14), for a CUDA machine with nothing downloaded:
#   1. the environment (GPU, torch, transformers, peft) and that the package imports from src/;
#   2. the invariant tests on CUDA (`pytest -m gpu`: overlap modes, FlyThinker-shared on CUDA,
#      CUDA-graph replays and compiled graph replays against CPU decoding, each start-at-SFT fusion
#      exactly the generator at step 0 in bf16 and decoding staggered like its parallel forward,
#      training under FSDP2 against one plain process);
#   3. `flythinker bench` at Qwen2.5-3B (generator) / Qwen2.5-1.5B (reasoner) shapes in bf16,
#      random weights, every overlap mode the machine has ("none", "streams"; "devices" with 2 GPUs),
#      with CUDA graphs and with compiled steps replayed from graphs, at batch 1 (the compiled
#      rows compile once per shape: larger batches would multiply that), plus CoT and Coconut;
#      FlyThinker-shared with adapters on every linear layer, apart and with each LoRA A stacked
#      under its base weight (flythinker-shared-stacked, uncompiled steps only); static states
#      kept across calls, so first_call_warmup_ms shows compilation and capture, paid once;
#   4. kernels and GPU-busy time per decode step at the same shapes (bench/kernel_profile.py).
# Each part has its own time limit and a failing part does not stop the next; the exit status is
# non-zero if any part failed. Everything goes to $OUT (or bench/out): gpu_check.log,
# bench-graphs.json/.png, bench-compiled.json/.png, pytest_gpu.xml, kernel_profile.json.
# Budget: part limits add to 970 s, more than one 10-minute call, so name the parts to run as
# arguments and split them over calls (or sessions):
#   bash bench/gpu_check.sh environment tests-gpu bench-graphs    # about 8 minutes
#   bash bench/gpu_check.sh bench-compiled kernel-profile         # about 8 minutes
# No argument runs every part. History: the version without compiled steps took 4.5-5 min on an
# H100; on an H200 (2026-12-04) tests-gpu took 107 s, while bench-graphs (then limited to 120 s)
# and bench-compiled (220 s) were cut off before writing their JSON.
# Run from anywhere: bash bench/gpu_check.sh [PART ...]
set -u
PARTS=(environment tests-gpu bench-graphs bench-compiled kernel-profile)
WANTED=("$@")
[ ${#WANTED[@]} -gt 0 ] || WANTED=("${PARTS[@]}")
for name in "${WANTED[@]}"; do
  if [[ ! " ${PARTS[*]} " == *" $name "* ]]; then
    echo "unknown part '$name'; the parts: ${PARTS[*]}" >&2
    exit 2
  fi
done
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/out}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PY="${PYTHON:-python3}"
# Not installed there: run from the source tree. jsonargparse may be missing, so the benchmark is
# called as a function rather than through the CLI.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
failed=()

part() {  # part NAME LIMIT_SECONDS COMMAND...: runs only if NAME was asked for
  local name=$1 limit=$2 start rc
  shift 2
  [[ " ${WANTED[*]} " == *" $name "* ]] || return 0
  echo "=== [$name] limit ${limit}s: $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== [$name] exit $rc after $(( $(date +%s) - start ))s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || failed+=("$name(rc=$rc)")
}

: > "$LOG"
part environment 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch, transformers, peft, matplotlib; import flythinker.commands.bench, flythinker.model.reasoners; \
print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.device_count(), \
\"transformers\", transformers.__version__, \"peft\", peft.__version__)'"

# The files with CUDA tests. test_fusion's and test_distributed's import the training and
# evaluation code, and FSDP's launches `python -m flythinker train`: they need the package's
# dependencies (jsonargparse, nltk, rouge_score, rank_bm25) installed on this machine.
part tests-gpu 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT_DIR/pytest_gpu.xml" \
  tests/test_decoding.py tests/test_shared.py tests/test_model.py tests/test_graphs.py tests/test_compile.py \
  tests/test_fusion.py tests/test_distributed.py

# Two benchmark runs, so that a slow compilation cannot cost the eager and graph figures: each
# writes its JSON only when it ends. Every ratio is to SFT decoding (and training) the same way.
bench_part() {  # bench_part NAME LIMIT STEPS
  part "$1" "$2" "$PY" - "$OUT_DIR" "$1" "$3" <<'PYEOF'
import json
import sys

from flythinker.commands.bench import bench_command

out, name, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
bench_command(
    shape="qwen2.5-3b", reasoner_shape="qwen2.5-1.5b", device="cuda", dtype="bfloat16",
    steps=steps, batches=[], prompt_tokens=128, new_tokens=48, repeats=3,
    train_batch=4, train_tokens=512, rationale_tokens=32, latent_thoughts=2,
    json=f"{out}/{name}.json", plot=f"{out}/{name}.png",
)
PYEOF
}
# Eager and graphed decoding, the eager training step.
bench_part bench-graphs 300 '["dynamic", "graph"]'
# Compiled steps replayed from graphs, the compiled training step (compiles once per model).
bench_part bench-compiled 400 '["compiled-graph"]'

part kernel-profile 90 "$PY" bench/kernel_profile.py "$OUT_DIR/kernel_profile.json" qwen2.5-3b qwen2.5-1.5b

if [ ${#failed[@]} -eq 0 ]; then
  echo "=== all parts passed; results in $OUT_DIR" | tee -a "$LOG"
  exit 0
fi
echo "=== failed parts: ${failed[*]}; see $LOG" | tee -a "$LOG"
exit 1
