#!/usr/bin/env bash
# The GPU checks run on a lent GPU machine (one command, a few minutes): the CUDA paths against the CPU
# (benchmarks/gpu.py --small), then the size ladder of benchmarks/scale.py with --device cuda. That machine has
# torch (CUDA) but neither RELION nor mrcfile/emtable/faiss: the three wheels travel in .whl/ (pip download, see
# the device notes) and the particles are rendered by deepcryo's own projector (scale.py --renderer deepcryo,
# which agrees with relion_project to a correlation of 0.99999 on clean images), so these figures are speed,
# not independent accuracy. Results land in $OUT (results.json, the table, the logs).
#     bash benchmarks/gpu_lease.sh SECONDS        # SECONDS: the command's own time budget
#     PY=.venv/bin/python DEVICE=cpu bash benchmarks/gpu_lease.sh 300   # the script itself, on a CPU machine
set -uo pipefail
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-16}
budget_s=${1:-420}
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
timeout 120 $PY benchmarks/gpu.py --small --device $([ $DEVICE = cuda ] && echo cuda:0 || echo cpu) --threads $THREADS 2>&1 | tail -12 > "$out/gpu_check.txt"
cat "$out/gpu_check.txt"
work=${WORK:-/tmp/scale_gpu}
left_min() { $PY -c "print(max(0.01, ($end - $(date +%s)) / 60 - 0.5))"; }
scale() { [ $(( end - $(date +%s) )) -gt 20 ] || return 0
  timeout $(( end - $(date +%s) )) $PY benchmarks/scale.py --work $work --device $DEVICE --renderer deepcryo \
  --threads $THREADS --max-minutes 0.75 --plot "$out/scale_gpu.png" --deadline-minutes "$(left_min)" "$@" 2>&1 \
  | grep -v "^|" ; }
scale --rungs mic4096 --programs defocus_predict
scale --rungs 2k@128 10k@128 --programs reconstruct swiftalign_train swiftalign_query swiftres_refine landscape_train
scale --rungs 2k@256 10k@256 --programs reconstruct swiftalign_train swiftalign_query swiftres_refine
scale --rungs 50k@128 --programs reconstruct swiftalign_train swiftalign_query
# the same machine's 16 CPU cores on the two stages every refinement iteration repeats (the index is shared)
[ $DEVICE = cuda ] && DEVICE=cpu scale --rungs 10k@128 --programs reconstruct swiftalign_query
$PY benchmarks/scale.py --work $work --device $DEVICE --report-only --plot "$out/scale_gpu.png" > "$out/table.md"
cp $work/results.json "$out/"
tar czf "$out/logs.tgz" -C $work $(cd $work && ls */*.log 2>/dev/null)
cat "$out/table.md"
