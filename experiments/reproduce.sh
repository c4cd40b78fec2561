#!/usr/bin/env bash
# Issue #12 end to end, resumable and in parts: the probe protocol study, the converged supervised reference, and
# the full table. Every step skips what is finished, so rerun it after a stop (or a session's end).
#
#   make reproduce                                   # all of it (many hours on 2 cores; a day at the paper's budget)
#   STEPS="study reference" bash experiments/reproduce.sh
#   PROTOCOL=coarse SIZE=32 STEPS=table bash experiments/reproduce.sh
#
# Data: ../shared/data (Image A, Image B, CIFAR-10 as JPEG), or $KERAS_ONEIMAGE_CIFAR10 for CIFAR-10.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-"study reference table report"}
PROTOCOL=${PROTOCOL:-coarse}   # chosen by the study (experiments/RESULTS.md, "Probe protocol study")
SIZE=${SIZE:-32}
REF_EPOCHS=${REF_EPOCHS:-8}    # the 128 px reference on record ran REF_EPOCHS=5 (RESULTS.md, probe study)
OUT=experiments/outputs
mkdir -p "$OUT/logs"
has() { [[ " $STEPS " == *" $1 "* ]]; }

# 1. The study: random trunks (2 seeds) in every setting, then the supervised trunks that exist.
if has study; then
  $PY experiments/probe_study.py --trunks random0,random1
fi

# 2. The converged supervised reference of the chosen setting (cosine schedule, early stop on val), then its
#    probes in the study.
if has reference; then
  $PY experiments/supervised_reference.py --image_size "$SIZE" --epochs "$REF_EPOCHS" --patience 3
  $PY experiments/probe_study.py --trunks supervised
  $PY experiments/probe_study.py --report
fi

# 3. The table: each method from Image A (2 seeds) and Image B (1 seed) at a fixed step count (30 minutes' worth),
#    random and supervised beside them; probes on full CIFAR-10 (45k train, 10k test), cached taps.
if has table; then
  TABLE="--protocol $PROTOCOL --image_size $SIZE --probe_epochs 36 --probe_augment 0"
  $PY experiments/paper_table.py --rows supervised --seeds 0 $TABLE   # the reference of step 2: one seed
  $PY experiments/paper_table.py --rows random,rotnet_a,jigsaw_a --seeds 0,1 $TABLE
  $PY experiments/paper_table.py --rows rotnet_b,jigsaw_b --seeds 0 $TABLE
  $PY experiments/paper_table.py --rows deepcluster_a,bigan_a_slow_encoder --seeds 0,1 $TABLE
  $PY experiments/paper_table.py --rows deepcluster_b,bigan_b_slow_encoder --seeds 0 $TABLE
  # BiGAN with E on G's optimizer (the default before 2026-12-03), and the §5 variants chosen on val
  $PY experiments/paper_table.py --rows bigan_a,bigan_b,bigan_a_equal_rates,deepcluster_a_rgb,random_sobel --seeds 0 $TABLE
  $PY experiments/paper_table.py --rows deepcluster_a_rgb_k1000,deepcluster_a_rgb_k20,deepcluster_a_rgb_k3000,deepcluster_a_rgb_k1000_recluster50 --seeds 0 $TABLE
  $PY experiments/paper_table.py --rows deepcluster_b_rgb,deepcluster_b_rgb_k1000 --seeds 0 $TABLE
  # run length: RotNet at 3x its 30-minute steps, from Image A and from 1,000 CIFAR-10 images (~40 min each alone)
  $PY experiments/paper_table.py --rows rotnet_a_steps4500,rotnet_n1000_steps4500 --seeds 0 $TABLE
fi

if has report; then
  $PY experiments/paper_table.py --report --protocol "$PROTOCOL" --image_size "$SIZE"
fi
