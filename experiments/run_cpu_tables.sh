#!/usr/bin/env bash
# Every CPU-scale result in experiments/RESULTS.md, in the order it was run on the 2-core machine (2026-11-26).
# Each step is resumable (finished rows/configurations are skipped), so the script can be rerun after a stop.
#
#   bash experiments/run_cpu_tables.sh            # all of it: about 2.5 hours on 2 cores
#   STEPS="paper e2e" bash experiments/run_cpu_tables.sh
#
# Scale (the paper's is in brackets): 32 px patches [224], 5 minutes of training per method row [hundreds of
# GPU-hours], CIFAR-10 subset of 1000 images per class, of which 10% of train is the validation split [full
# ImageNet/CIFAR], probes on cached taps (no probe augmentation) for 36 epochs [36, with augmentation].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CLI=${CLI:-.venv/bin/keras-oneimage}
IMAGES=../shared/data/images
OUT=experiments/outputs
STEPS=${STEPS:-"probe_lr paper e2e ablation tune transfer report"}
mkdir -p "$OUT/logs"

has() { [[ " $STEPS " == *" $1 "* ]]; }

# 1. The probe learning rate, chosen on the validation split (never on test).
if has probe_lr && [ ! -f "$OUT/probe_lr.json" ]; then
  $PY experiments/probe_lr.py --rates 0.1,0.01,0.001 --max_per_class 1000 --probe_epochs 36 --train_minutes 3 \
      --probe_augment 0
fi
LR=$($PY -c "import json; print(json.load(open('$OUT/probe_lr.json'))['chosen'])")
PROBE="--probe_epochs 36 --probe_lr $LR --probe_augment 0 --max_per_class 1000"
TABLE="--image_size 32 --batch_size 64 --steps_per_epoch 100 $PROBE"

# 2. The paper's table (Table 2 / Fig. 2 / Fig. 3) at 5 minutes per row, 'cifar' probe protocol. Its supervised
#    row is now the converged reference (experiments/supervised_reference.py); the 2026-11-26 table used a
#    5.6-minute one. The full-budget table of issue #12 is experiments/reproduce.sh.
PAPER5="--protocol cifar --section paper_table --out $OUT/paper_table --steps 100000 --train_minutes 5"
if has paper; then
  $PY experiments/paper_table.py --rows rotnet_a,random,supervised,rotnet_b $TABLE $PAPER5 --precision auto
  $PY experiments/paper_table.py --rows deepcluster_a,bigan_a,deepcluster_b,bigan_b $TABLE $PAPER5 --precision float32
fi

# 3. End to end (issue #8): `keras-oneimage fit` on Image A -> exported conv1-conv2 SavedModel, timed; then its
#    CIFAR-10 conv2 probe, to compare with the supervised row of the table.
if has e2e && [ ! -f "$OUT/e2e/probe.json" ]; then
  rm -rf "$OUT/e2e" && mkdir -p "$OUT/e2e"
  start=$(date +%s%N)
  $CLI fit --image "$IMAGES/image_a.jpg" --method rotnet --image_size 32 --batch_size 64 --epochs 1000 \
      --steps_per_epoch 100 --max_minutes 5 --precision auto --output_dir "$OUT/e2e/run"
  $CLI export --checkpoint "$OUT/e2e/run" --layers conv1,conv2 --name rotnet_a --base_dir "$OUT/e2e/models"
  end=$(date +%s%N)
  echo "{\"fit_to_export_seconds\": $(( (end - start) / 1000000000 ))}" > "$OUT/e2e/timing.json"
  $CLI probe --checkpoint "$OUT/e2e/run" --layers conv1,conv2 --epochs 36 --learning_rate "$LR" --noaugment \
      --max_per_class 1000 --split test --output "$OUT/e2e/probe.json"
fi

# 4. The augmentation ablation (RotNet, Image A): remove one component at a time, add one at a time.
if has ablation; then
  $PY experiments/ablation.py --epochs 1 --steps_per_epoch 100 --precision auto --probe_epochs 36 --probe_lr "$LR" \
      --probe_augment 0 --max_per_class 500
fi

# 5. A tuned search on the validation split, then the best recipe against the paper's on test.
if has tune; then
  $PY experiments/tune_cifar.py --algorithm bayesian --max_trials 4 --epochs 1 --steps_per_epoch 100 \
      --trial_probe_epochs 36 --refit_epochs 1 --final_probe_epochs 36 --precision auto --probe_augment 0 \
      --probe_lr "$LR" --max_per_class 500
fi

# 6. Table 4: fine-tuning with conv1-2 frozen from a single-image RotNet, random, supervised; and from scratch.
if has transfer; then
  $PY experiments/transfer_table.py --rotnet_checkpoint "$OUT/e2e/run" --max_per_class 500 --epochs 3 \
      --train_minutes 3
fi

if has report; then
  $PY experiments/paper_table.py --report $TABLE $PAPER5
  $PY experiments/collect_results.py
fi
