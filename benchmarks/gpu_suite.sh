#!/usr/bin/env bash
# Every GPU check and benchmark of the repo, in parts that each fit one call of the device tool
# (10 minutes). Results and logs go to $OUT (the tool brings them back), else ./gpu_out.
#
#   bash benchmarks/gpu_session.sh tests        # GPU tests (marker gpu)              ~2 min
#   bash benchmarks/gpu_session.sh kernels      # linear_2_4.py, writes crossover.json ~5 min
#   bash benchmarks/gpu_session.sh end_to_end   # needs crossover.json from `kernels` ~5 min
#   bash benchmarks/gpu_session.sh train        # train_throughput.py, demo-shaped and 1b
#
# The device machines have torch, transformers, accelerate and triton but not omegaconf (which
# distill.config needs); prepare its wheels here once and carry `.whl`:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl omegaconf==2.4.0
# The demo teacher cannot travel (the tool moves 64 MiB, the teacher is 270 MB) and the machines
# have no network, so `train` uses its shapes with random weights (--model demo-shaped); the quality
# runs of issue #4 (configs/h100_recovery.yaml) need a machine that can reach the teacher.
set -uo pipefail
part=${1:?usage: gpu_session.sh tests|kernels|end_to_end|train}
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
  *) echo "gpu_session.sh: unknown part '$part'" >&2; exit 2 ;;
esac
