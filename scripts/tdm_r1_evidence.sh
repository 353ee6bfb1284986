#!/usr/bin/env bash
# Reproduces the TDM-R1 evidence table and plot in README.md ("TDM-R1 on the embedded world"): world:student and three
# continuations of it with the same rollouts per iteration (8 prompts x 8 images) and the same iterations: TDM-R1
# (configs/world/tdm_r1.yaml), GRPO + DMD (configs/world/grpo.yaml, λ = 1) and plain TDM (--algo tdm: TDM-R1 with
# λ = 1 and no surrogate, the control; it scores no image), and TDM-R1 with a 10-iteration critic warm-up. Each is trained with every seed in SEEDS (seeds in
# parallel, one core each), checkpointed every EVERY iterations, and every checkpoint is evaluated with `rlfew eval`
# at 4 steps on world:eval and on a prompt file drawn from the world grammar (scripts/draw_world_prompts.py), so
# accuracy can be drawn against images scored; scripts/tdm_r1_evidence_table.py prints the table and draws the plot.
# LONG=N adds runs of N iterations (checkpoints every 50) to see whether more images help: TDM-R1 with seeds 0 and 1,
# GRPO + DMD with seed 0.
# Usage: [SEEDS="0 1"] [EVERY=20] [LONG=150] scripts/tdm_r1_evidence.sh [ITERATIONS] [OUT_DIR]
#        (defaults: 60, runs/tdm-evidence)
set -euo pipefail
iterations=${1:-60}
out=${2:-runs/tdm-evidence}
seeds=${SEEDS:-0 1}
every=${EVERY:-20}
rlfew=${RLFEW:-.venv/bin/rlfew}
python=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
mkdir -p "$out"
drawn="$out/drawn_prompts.txt"
"$python" scripts/draw_world_prompts.py "$drawn" 96 7

evaluate() {  # evaluate NAME MODEL_ARGS... -> $out/<name>.json and $out/<name>.drawn.json
  local name=$1; shift
  [[ -f "$out/$name.drawn.json" ]] && return 0
  "$rlfew" eval "$@" --steps 4 --out "$out/$name.json"
  "$rlfew" eval "$@" --steps 4 --prompts "$drawn" --out "$out/$name.drawn.json"
}

train() {  # train NAME RECIPE OVERRIDES... ; records the wall time, then evaluates every checkpoint
  local name=$1 recipe=$2; shift 2
  if [[ ! -f "$out/$name.seconds" ]]; then
    local start=$SECONDS
    "$rlfew" train "$recipe" runtime.backend=inprocess "run.output_dir=$out" "run.name=$name" \
      "train.steps=$iterations" "train.save_every=$every" train.sample_every=0 "$@" > "$out/$name.log" 2>&1
    echo $((SECONDS - start)) > "$out/$name.seconds"
  fi
  for checkpoint in "$out/$name"/checkpoints/step_*; do
    evaluate "$name@${checkpoint##*step_}" --checkpoint "$checkpoint"
  done
}

one_seed() {
  local seed=$1
  train "tdm_r1-s$seed" configs/world/tdm_r1.yaml "run.seed=$seed"
  train "tdm-s$seed" configs/world/tdm_r1.yaml "run.seed=$seed" algo.name=tdm \
    "algo.options={steps_per_rollout: 2}" "reward=[]"
  train "grpo-dmd-s$seed" configs/world/grpo.yaml "run.seed=$seed" algo.options.reg_weight=1.0
  # the critic warm-up lever: F learns the student for 10 iterations before the generator follows it
  train "tdm_r1-warmup-s$seed" configs/world/tdm_r1.yaml "run.seed=$seed" algo.options.critic_warmup=10
}

evaluate student --model world:student
for seed in $seeds; do one_seed "$seed" & done
if [[ -n "${LONG:-}" ]]; then
  for seed in 0 1; do
    train "tdm_r1-long-s$seed" configs/world/tdm_r1.yaml "run.seed=$seed" "train.steps=$LONG" train.save_every=50 &
  done
  train "grpo-dmd-long-s0" configs/world/grpo.yaml run.seed=0 algo.options.reg_weight=1.0 "train.steps=$LONG" \
    train.save_every=50 &
fi
wait
"$python" scripts/tdm_r1_evidence_table.py "$out"
