#!/usr/bin/env bash
# The embedded music teachers and their paper-table rows, from the repository root:
#   bash recipes/MUSDB18/make_embedded.sh
# Every step resumes from its checkpoint when run again (the toy data is kept when present).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
DATA=$ROOT/data/musdb18hq            # the recipes' and benchmark's default (relative paths in what they record)
HTDEMUCS_EPOCHS=${HTDEMUCS_EPOCHS:-40}
CONVTASNET_EPOCHS=${CONVTASNET_EPOCHS:-15}
QAT_EPOCHS=${QAT_EPOCHS:-3}

[ -d "$DATA/train" ] || "$PY" -m fqss_plugin.cli make-data music --out "$DATA" --train-tracks 32 --valid-tracks 4 \
    --test-tracks 10 --seconds 20 --jobs 2 --quiet

cd "$ROOT/recipes/MUSDB18/HTDemucs"
"$PY" train.py conf/float.yaml exp_dir=exp/embedded_float optim.epochs="$HTDEMUCS_EPOCHS"
mkdir -p pretrained/embedded_float
cp exp/embedded_float/{best.th,history.json,test_results.json,conf.yaml} pretrained/embedded_float/

cd "$ROOT/recipes/MUSDB18/ConvTasNet"
"$PY" train.py conf/float.yaml exp_dir=exp/embedded_float optim.epochs="$CONVTASNET_EPOCHS"
mkdir -p pretrained/embedded_float
cp exp/embedded_float/{best_model.pth,history.json,test_results.json,conf.yaml} pretrained/embedded_float/

cd "$ROOT"
"$PY" benchmarks/music_table.py --epochs "$QAT_EPOCHS" \
    --teacher HTDemucs=recipes/MUSDB18/HTDemucs/pretrained/embedded_float/best.th \
    --teacher ConvTasNet=recipes/MUSDB18/ConvTasNet/pretrained/embedded_float/best_model.pth
"$PY" benchmarks/music_sensitivity.py --recipe HTDemucs \
    --package recipes/MUSDB18/HTDemucs/pretrained/embedded_float/best.th
