#!/usr/bin/env bash
# Fine-tune the shipped defocus CNN on simulated PSDs of every image-formation model of
# deepcryo.defocus.training_data (ice/carbon and particle-only fields; counting and integrating detectors;
# B-factors, drift, vibration, coloured noise; 0.5-2.5 Å/px; 2048², 4096², 5760x4092, 8192² micrographs;
# mean defocus 0.2-5 µm, U - V up to 3000 Å; a phase shift of 0-180° on 20 % of them).
#
#   scripts/retrain_defocus.sh OUTPUT_DIR            # GPU recipe: 16 processes simulate, cuda:0 trains;
#                                                    # ~4 min on one H200 with 16 cores (benchmarks/RESULTS.md)
#   scripts/retrain_defocus.sh OUTPUT_DIR --small    # the same path on the CPU, small: ~2 min on 2 cores
#
# Writes into OUTPUT_DIR: defocus_cnn.pt (the best weights: copy to deepcryo/defocus/weights/),
# validation.json (figures per image model on the held-out 15 %, for the new and for the shipped weights),
# train.log, and defocus_cnn.pt.ckpt (the checkpoint; `--continue` resumes from it).
# Needs only Python with torch and numpy (no mrcfile, emtable, faiss or Scipion); PYTHON chooses the
# interpreter (default: python), run from anywhere (the repository is put on PYTHONPATH).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    sed -n '2,16p' "$0"
    exit 2
fi
out=$1
small=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
if [[ "$small" == "--small" ]]; then
    # CPU check of the same path: 1200 PSDs, 2 processes, 50 s of training
    args=(--simulate 1200 --workers 2 --device cpu --threads 2 --batch-size 32 --epochs 20 --time-limit 50)
elif [[ -z "$small" ]]; then
    # 24000 PSDs simulated by 16 processes (~30 s), then at most 150 s of training on cuda:0
    args=(--simulate 24000 --workers 16 --device cuda --threads 4 --batch-size 128 --epochs 200 --time-limit 150)
else
    echo "usage: $0 OUTPUT_DIR [--small]" >&2
    exit 2
fi
mkdir -p "$out"
start=$(date +%s)
"$PYTHON" -m deepcryo.defocus train "${args[@]}" --seed 19 --init shipped --learning-rate 1e-3 --patience 8 \
    --output "$out/defocus_cnn.pt" --report "$out/validation.json" 2>&1 | tee "$out/train.log"
echo "retrain_defocus: $(( $(date +%s) - start )) s in all; wrote $out/defocus_cnn.pt and $out/validation.json" \
    | tee -a "$out/train.log"
