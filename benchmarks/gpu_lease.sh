#!/usr/bin/env bash
# The GPU checks run on a lent GPU machine (one command, a few minutes): the CUDA paths against the CPU
# (benchmarks/gpu.py --small), then the size ladder of benchmarks/scale.py with --device cuda. That machine has
# torch (CUDA) but neither RELION nor mrcfile/emtable/faiss: the three wheels travel in .whl/ (pip download, see
# the device notes) and the particles are rendered by deepcryo's own projector (scale.py --renderer deepcryo,
# which agrees with relion_project to a correlation of 0.99999 on clean images), so these figures are speed,
# not independent accuracy. Results land in $OUT (results.json, the table, the logs).
# Stages: check (gpu.py), small (a 4096² micrograph batch; 2 k and 10 k particles at box 128), large (box 256,
# 50 k at box 128, the same machine's CPU cores at 10k@128). The scale results accumulate in WORK across calls on
# one machine only (a fresh machine starts bare), so each call's $OUT holds its own rungs.
#     bash benchmarks/gpu_lease.sh SECONDS check small     # SECONDS: the command's own time budget
#     PY=.venv/bin/python DEVICE=cpu bash benchmarks/gpu_lease.sh 300 check small   # the script, on a CPU machine
set -uo pipefail
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-16}
budget_s=${1:-420}
stages=" ${*:2} "
end=$(( $(date +%s) + budget_s - 25 ))
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/machine.txt"
$PY -c "import torch, numpy, faiss; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'numpy', numpy.__version__, 'faiss', faiss.__version__); print('cpus', __import__('os').cpu_count())" \
  | tee -a "$out/machine.txt"
[[ $stages == *" check "* ]] && timeout 150 $PY benchmarks/gpu.py --small --device $([ $DEVICE = cuda ] && echo cuda:0 || echo cpu) --threads $THREADS > "$out/gpu_check.txt" 2>&1
[ -f "$out/gpu_check.txt" ] && grep -v "^ \|^epoch\|^iteration" "$out/gpu_check.txt" | tail -40
work=${WORK:-/tmp/scale_gpu}
left_min() { $PY -c "print(max(0.01, ($end - $(date +%s)) / 60 - 0.5))"; }
scale() { [ $(( end - $(date +%s) )) -gt 20 ] || return 0
  timeout $(( end - $(date +%s) )) $PY benchmarks/scale.py --work $work --device $DEVICE --renderer deepcryo \
  --threads $THREADS --max-minutes 0.75 --plot "$out/scale_gpu.png" --deadline-minutes "$(left_min)" "$@" 2>&1 \
  | grep -v "^|" ; }
if [[ $stages == *" small "* ]]; then
  scale --rungs mic4096 --programs defocus_predict
  scale --rungs 2k@128 10k@128 --programs reconstruct swiftalign_train swiftalign_query swiftres_refine landscape_train
fi
if [[ $stages == *" large "* ]]; then
  scale --rungs 2k@256 10k@256 --programs reconstruct swiftalign_train swiftalign_query swiftres_refine
  scale --rungs 50k@128 --programs reconstruct swiftalign_train swiftalign_query
  # the same machine's CPU cores on the two stages every refinement iteration repeats (the index is shared)
  [ $DEVICE = cuda ] && DEVICE=cpu scale --rungs 10k@128 --programs reconstruct swiftalign_train swiftalign_query
fi
$PY benchmarks/scale.py --work $work --device $DEVICE --report-only --plot "$out/scale_gpu.png" > "$out/table.md"
[ -f $work/results.json ] && cp $work/results.json "$out/"
[ -d $work ] && tar czf "$out/logs.tgz" -C $work $(cd $work && ls */*.log 2>/dev/null)
cat "$out/table.md"
