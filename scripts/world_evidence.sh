#!/usr/bin/env bash
# Reproduces the DMDR evidence table in README.md ("DMDR on the embedded world"): the world teacher at 50 and 4
# steps, world:student at 4, 2 and 1 steps, and four continuations of the student for the same number of iterations
# (DMD only, DMD with the GAN head, reward only, DMDR), each trained with every seed in SEEDS and evaluated with
# `rlfew eval` on world:eval at 4 steps; scripts/evidence_table.py prints the table (means over the seeds).
# Usage: [SEEDS="0 1"] scripts/world_evidence.sh [ITERATIONS] [OUT_DIR]   (defaults: 300, runs/evidence)
set -euo pipefail
iterations=${1:-300}
out=${2:-runs/evidence}
seeds=${SEEDS:-0 1}
rlfew=${RLFEW:-.venv/bin/rlfew}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
mkdir -p "$out"

"$rlfew" eval --model world:teacher --steps 50 --guidance 3 --out "$out/teacher-50.json"
"$rlfew" eval --model world:teacher --steps 4 --guidance 3 --out "$out/teacher-4.json"
for steps in 4 2 1; do
  "$rlfew" eval --model world:student --steps "$steps" --out "$out/student-$steps.json"
done

for seed in $seeds; do
  common=(runtime.backend=inprocess "run.output_dir=$out" "train.steps=$iterations" train.sample_every=100
          "run.seed=$seed")
  "$rlfew" train configs/world/dmdr.yaml --algo dmd "${common[@]}" "run.name=dmd-only-s$seed" \
    roles.critic.lora_rank=0
  "$rlfew" train configs/world/dmdr.yaml --algo dmd "${common[@]}" "run.name=dmd-gan-s$seed" \
    roles.critic.lora_rank=0 algo.options.gan_generator_weight=5.0e-3
  "$rlfew" train configs/world/dmdr.yaml "${common[@]}" "run.name=reward-only-s$seed" \
    algo.options.distillation_weight=0 algo.options.cold_start_steps=0
  "$rlfew" train configs/world/dmdr.yaml "${common[@]}" "run.name=dmdr-s$seed"
  for run in dmd-only dmd-gan reward-only dmdr; do
    "$rlfew" eval --checkpoint "$out/$run-s$seed" --steps 4 --out "$out/$run-s$seed.json"
  done
done
.venv/bin/python scripts/evidence_table.py "$out"
