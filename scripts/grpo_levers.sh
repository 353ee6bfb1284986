#!/usr/bin/env bash
# Reproduces the "levers tried beyond the table" runs of README.md ("GRPO on the embedded world"): GRPO + KL for 300
# iterations (seeds 0 and 1, in parallel), on category-balanced training prompts for 120 iterations, and plain GRPO on
# one hard caption; each evaluated as scripts/grpo_evidence.sh does (run that first: it draws the held-out file).
# Usage: scripts/grpo_levers.sh [OUT_DIR] [EVIDENCE_DIR]   (defaults: runs/grpo-levers, runs/grpo-evidence)
set -euo pipefail
out=${1:-runs/grpo-levers}
drawn=${2:-runs/grpo-evidence}/drawn_prompts.txt
rlfew=${RLFEW:-.venv/bin/rlfew}
python=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
mkdir -p "$out"
kl=(algo.options.reg=kl algo.options.reg_weight=0.04 "roles={generator: {lora_rank: 0}}")

run() {  # run NAME OVERRIDES...: train configs/world/grpo.yaml in-process, then evaluate its last checkpoint
  local name=$1; shift
  "$rlfew" train configs/world/grpo.yaml runtime.backend=inprocess "run.output_dir=$out" "run.name=$name" \
    train.sample_every=0 "$@" > "$out/$name.log" 2>&1
  "$rlfew" eval --checkpoint "$out/$name" --steps 4 --out "$out/$name.json"
  "$rlfew" eval --checkpoint "$out/$name" --steps 4 --prompts "$drawn" --out "$out/$name.drawn.json"
}

for seed in 0 1; do
  run "long-kl0.04-s$seed" "run.seed=$seed" train.steps=300 train.save_every=150 "${kl[@]}" &
done
wait
"$python" scripts/draw_world_prompts.py "$out/balanced_train.txt" 600 11 train
run balanced-kl-s0 train.steps=120 train.save_every=60 "train.prompts=$out/balanced_train.txt" "${kl[@]}"
echo "a red circle left of a blue square" > "$out/one_prompt.txt"
run one-prompt-none train.steps=50 train.save_every=50 train.log_every=5 "train.prompts=$out/one_prompt.txt" \
  train.prompts_per_step=4 train.group_size=12 algo.options.reg=none "roles={generator: {lora_rank: 0}}" \
  "reward=[{name: world, options: {mode: correct}}]"
