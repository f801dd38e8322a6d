#!/usr/bin/env bash
# The GPU suite: every GPU test and benchmark of the repo, in four parts of at most about 10 minutes
# each. Results and logs go to $OUT when it is set, else to ./gpu_out.
#
#   bash benchmarks/gpu_suite.sh tests        # GPU tests (marker gpu)              ~2 min
#   bash benchmarks/gpu_suite.sh kernels      # linear_2_4.py, writes crossover.json ~5 min
#   bash benchmarks/gpu_suite.sh end_to_end   # needs crossover.json from `kernels` ~5 min
#   bash benchmarks/gpu_suite.sh train        # train_throughput.py, demo-shaped and 1b
#
# On a machine without network that lacks omegaconf (which distill.config needs), put its wheels in
# .whl/ first; they are installed into /tmp/site:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl omegaconf==2.4.0
# `train` uses the demo teacher's shapes with random weights (--model demo-shaped), so it needs
# neither the teacher nor network; the quality runs (configs/h100_recovery.yaml) need the teacher.
set -uo pipefail
part=${1:?usage: gpu_suite.sh tests|kernels|end_to_end|train}
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$out/device.csv" 2>&1
case "$part" in
  tests)
    python3 -m pytest -q -m gpu tests/runtime 2>&1 | tee "$out/gpu_tests.log" ;;
  kernels)
    python3 benchmarks/linear_2_4.py --write-table "$out/crossover.json" --json "$out/linear.json" \
      --shapes 4096x4096,1024x4096,14336x4096,4096x14336,576x576,192x576,1536x576,576x1536 2>&1 | tee "$out/linear.log" ;;
  end_to_end)
    table=${TABLE:-crossover.json}
    python3 benchmarks/end_to_end.py --table "$table" --layers 8 --json "$out/end_to_end.json" 2>&1 | tee "$out/end_to_end.log" ;;
  train)
    for batch in 16 32; do
      python3 benchmarks/train_throughput.py --model demo-shaped --batch "$batch" --seq 1024 \
        --json "$out/throughput_demo_$batch.json" 2>&1 | tee "$out/throughput_demo_$batch.log"
    done
    python3 benchmarks/train_throughput.py --model 1b --batch 8 --seq 2048 --variants pipeline,pipeline+compile \
      --json "$out/throughput_1b.json" 2>&1 | tee "$out/throughput_1b.log" ;;
  *) echo "gpu_suite.sh: unknown part '$part'" >&2; exit 2 ;;
esac
