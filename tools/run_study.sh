#!/usr/bin/env bash
# The start-at-SFT study (configs/studies/start_at_sft.yaml), every stage in order; rerun to resume.
# Each `flythinker run` resumes by itself (finished checkpoints and predictions are reused), so a
# killed or timed-out session loses at most the method it was training.
#   nohup bash tools/run_study.sh > runs/study.log 2>&1 &
# A stage name as the argument starts there, skipping the ones before it (a machine whose runs/ was
# lost need not retrain stages whose results are already published):
#   nohup bash tools/run_study.sh seed1 > runs/study.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
STAGES=(remedies stage1 capacity seed1 seed1_sampling seed0_review variants shared baselines baselines_review capacity_remedies rest)
FROM=${1:-${STAGES[0]}}
if [[ ! " ${STAGES[*]} " == *" $FROM "* ]]; then
  echo "unknown stage '$FROM'; the stages, in order: ${STAGES[*]}" >&2
  exit 2
fi
started=false
# `stage NAME [FILE ...]`: the study with configs/studies/FILE.yaml stacked on it, in order, at the
# learning rate chosen below; skipped if the stage comes before the one asked to start at.
stage() {
  local name=$1; shift
  if [ "$name" = "$FROM" ]; then started=true; fi
  if ! $started; then echo "== stage $name skipped"; return; fi
  echo "== stage $name"
  local configs=(--config "$STUDY")
  for file in "$@"; do configs+=(--config "configs/studies/$file.yaml"); done
  "$FLYTHINKER" run "${configs[@]}" --training.lr "$LR"
}
FLYTHINKER=${FLYTHINKER:-.venv/bin/flythinker}
STUDY=configs/studies/start_at_sft.yaml
LR_DIR=${LR_DIR:-runs/study-lr}

# 1. The learning rate: SFT's held-out loss on the validation split, one run per candidate. A choice
#    already recorded (docs/results/start_at_sft/lr_choice.json, made by this step in an earlier
#    session; the runs are deterministic) is reused instead of retraining both candidates.
RECORDED=docs/results/start_at_sft/lr_choice.json
if [ ! -f "$LR_DIR/choice.json" ] && [ -f "$RECORDED" ]; then
  mkdir -p "$LR_DIR" && cp "$RECORDED" "$LR_DIR/choice.json"
fi
if [ -f "$LR_DIR/choice.json" ]; then
  LR=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["lr"])' "$LR_DIR/choice.json")
else
  for lr in 5.0e-5 1.5e-4; do
    "$FLYTHINKER" run --config "$STUDY" --config configs/studies/start_at_sft_lr.yaml \
      --training.lr "$lr" --out "$LR_DIR/$lr"
  done
  LR=$(.venv/bin/python - "$LR_DIR" <<'PY'
import json, sys
from pathlib import Path
losses = {}
for metrics in sorted(Path(sys.argv[1]).glob("*/metrics.json")):
    losses[metrics.parent.name] = json.loads(metrics.read_text())["abstract_generation"]["sft"]["heldout_loss"]["per_token"]
best = min(losses, key=losses.get)
Path(sys.argv[1], "choice.json").write_text(json.dumps({"validation_loss": losses, "lr": best}, indent=2) + "\n")
print(best)
PY
  )
fi
echo "== learning rate chosen on validation: $LR"

# 2. Stage 2 first (configs/studies/remedies.yaml): a frozen reasoner and signal dropout, the two
#    remedies for the overfitting stage 1 found (abstracts, 64 records; SFT and scale 10 reused).
stage remedies remedies
# 3. Stage 1 (configs/studies/stage1.yaml): SFT and the zero projection at scales 10 and 30, both tasks.
stage stage1 stage1
# 4. Stage 3 (configs/studies/capacity.yaml): every training record outside validation (abstracts),
#    SFT and the scale-10 projection, with validation curves and the weights of their lowest point.
stage capacity capacity
# 5. Stage 4 (configs/studies/seed1.yaml): a second seed for product_review's SFT and projections.
stage seed1 seed1
# 5b. Stage 4b (configs/studies/seed1_sampling.yaml): stage 4's checkpoints decoded with the
#    published sampling (read in place, not retrained).
stage seed1_sampling seed1 seed1_sampling
# 5c. Stage 4c (configs/studies/seed0_review.yaml): stage 1's seed-0 review rows (SFT, scale 10)
#    again, to pool with seed 1 (tools/pool_seeds.py); stage 1 reuses them.
stage seed0_review seed0_review
# 6. Stage 5 (configs/studies/variants.yaml): the zero gate, the lambda warm-up and the random
#    projection on 64 abstracts, each with its validation curve and best weights.
stage variants variants
# 7. Stage 6 (configs/studies/shared.yaml): FlyThinker-shared, adapters on every linear layer and on q/v.
stage shared shared
# 8. Stage 7 (configs/studies/baselines.yaml): non-personalized, RAG, CoT and Coconut at the same budget.
stage baselines baselines
# 8b. Stage 7b (configs/studies/baselines_review.yaml): the same baselines on product_review. Stage
#    1's seed-0 SFT row is the same run: copied in rather than trained again, when it is at hand.
if [ -f runs/study-start-at-sft/product_review/sft/metrics.json ] && [ ! -e runs/study-baselines/product_review/sft ]; then
  mkdir -p runs/study-baselines/product_review
  cp -r runs/study-start-at-sft/product_review/sft runs/study-baselines/product_review/sft
fi
stage baselines_review baselines baselines_review
# 9. Stage 3b (configs/studies/capacity_remedies.yaml): stage 2's remedies with 160 abstracts.
stage capacity_remedies capacity capacity_remedies
# 10. Every other row (earlier stages' rows are reused).
stage rest
