#!/usr/bin/env bash
# Reproduces the GRPO evidence table in README.md ("GRPO on the embedded world"): world:student and five
# continuations of it for the same number of iterations and images (GRPO with reg none, reg kl at two β, reg dmd at
# two λ, and DMDR for reference with as many images per iteration), each trained with every seed in SEEDS (seeds run
# in parallel, one core each) and evaluated with `rlfew eval` at 4 steps on world:eval and on a prompt file drawn
# from the world grammar (scripts/draw_world_prompts.py); scripts/grpo_evidence_table.py prints the table.
# Usage: [SEEDS="0 1"] scripts/grpo_evidence.sh [ITERATIONS] [OUT_DIR]   (defaults: 60, runs/grpo-evidence)
set -euo pipefail
iterations=${1:-60}
out=${2:-runs/grpo-evidence}
seeds=${SEEDS:-0 1}
rlfew=${RLFEW:-.venv/bin/rlfew}
python=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
mkdir -p "$out"
drawn="$out/drawn_prompts.txt"
"$python" scripts/draw_world_prompts.py "$drawn" 96 7

evaluate() {  # evaluate MODEL_ARGS... -> $out/<name>.json and $out/<name>.drawn.json
  local name=$1; shift
  "$rlfew" eval "$@" --steps 4 --out "$out/$name.json"
  "$rlfew" eval "$@" --steps 4 --prompts "$drawn" --out "$out/$name.drawn.json"
}

train() {  # train NAME RECIPE OVERRIDES... ; records the wall time of the training run (skipped once evaluated)
  local name=$1 recipe=$2; shift 2
  [[ -f "$out/$name.drawn.json" ]] && return 0
  local start=$SECONDS
  "$rlfew" train "$recipe" runtime.backend=inprocess "run.output_dir=$out" "run.name=$name" \
    "train.steps=$iterations" "train.save_every=$iterations" train.sample_every=0 "$@" > "$out/$name.log" 2>&1
  echo $((SECONDS - start)) > "$out/$name.seconds"
  evaluate "$name" --checkpoint "$out/$name"
}

one_seed() {
  local seed=$1 grpo=(configs/world/grpo.yaml "run.seed=$1")
  local no_critic="roles={generator: {lora_rank: 0}}"
  train "grpo-none-s$seed" "${grpo[@]}" algo.options.reg=none "$no_critic"
  train "grpo-kl0.04-s$seed" "${grpo[@]}" algo.options.reg=kl algo.options.reg_weight=0.04 "$no_critic"
  train "grpo-kl1-s$seed" "${grpo[@]}" algo.options.reg=kl algo.options.reg_weight=1.0 "$no_critic"
  train "grpo-dmd0.1-s$seed" "${grpo[@]}" algo.options.reg_weight=0.1
  train "grpo-dmd1-s$seed" "${grpo[@]}" algo.options.reg_weight=1.0
  # DMDR at the same iterations and images per iteration (64; its reward is differentiable, in the learner)
  train "dmdr-s$seed" configs/world/dmdr.yaml "run.seed=$seed" train.prompts_per_step=64 train.group_size=1
}

evaluate student --model world:student
for seed in $seeds; do one_seed "$seed" & done
wait
"$python" scripts/grpo_evidence_table.py "$out"
