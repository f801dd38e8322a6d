#!/usr/bin/env bash
# Run the distill pipeline through `accelerate launch`.
#
#   bash launch.sh [--accelerate cpu|single_gpu|multi_gpu|fsdp] [--num-processes N] CONFIG [key=value ...]
#                  [--only STAGE] [--from STAGE] [--discard-partial STAGE] [--restart] [--verbose]
#
#   --accelerate      an accelerate config from configs/accelerate/ (default: single_gpu when a GPU
#                     is visible, else cpu)
#   --num-processes   processes to start (default 1; on CPU each process is a gloo rank)
#                     (--accelerate fsdp: multi-GPU with the student sharded, i.e. train.sharding=fsdp;
#                     on CPU ranks add train.sharding=fsdp to a cpu launch instead)
#   key=value         dotted config overrides, e.g. train.steps=50 'eval.files=[a.txt,b.txt]'
#   --only STAGE      run or re-run one stage (teacher, teacher_logits, prune, distill, export, evaluate)
#   --from STAGE      re-run STAGE and every stage after it (--only/--from drop STAGE's unfinished run)
#   --discard-partial STAGE   drop STAGE's unfinished run, keep every finished stage, go on as usual
#   --restart         delete the run dir and start over
#   --verbose         show every library's warnings (by default those about what distill does on purpose are dropped)
#   --help-config [SECTION]   every config key with its type, default and meaning (docs/config.md)
# Multi-node: export MACHINE_RANK, NUM_MACHINES, MAIN_PROCESS_IP (and MAIN_PROCESS_PORT) on each node.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fail() {
  echo "launch.sh: error: $*" >&2
  exit 2
}

# the value after a flag that takes one: refuse a flag given last, with nothing after it
value_of() {
  [ $# -ge 2 ] || fail "$1 needs a value (see bash launch.sh --help)"
  printf '%s' "$2"
}

# single_gpu when a GPU is visible, else cpu. nvidia-smi answers in well under a second where torch
# takes seconds to import; torch decides only where neither tells (CUDA_VISIBLE_DEVICES set, another
# vendor's device nodes)
default_accelerate_config() {
  if [ -z "${CUDA_VISIBLE_DEVICES+set}" ] && command -v nvidia-smi >/dev/null 2>&1 \
      && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo single_gpu
  elif ! compgen -G '/dev/nvidia[0-9]*' >/dev/null && [ ! -e /dev/kfd ]; then
    echo cpu  # no GPU device node at all
  elif python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo single_gpu
  else
    echo cpu
  fi
}

accelerate_config=""
num_processes=1
pipeline_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --accelerate) accelerate_config=$(value_of "$@"); shift 2 ;;
    --accelerate=*) accelerate_config="${1#*=}"; shift ;;
    --num-processes) num_processes=$(value_of "$@"); shift 2 ;;
    --num-processes=*) num_processes="${1#*=}"; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --help-config) shift; exec python -m distill.run.config_reference "$@" ;;
    *) pipeline_args+=("$1"); shift ;;
  esac
done
[ ${#pipeline_args[@]} -gt 0 ] || fail "no config file given (see bash launch.sh --help)"
if [ -n "$accelerate_config" ] && [ ! -f "$here/configs/accelerate/$accelerate_config.yaml" ]; then
  fail "no accelerate config $here/configs/accelerate/$accelerate_config.yaml (choose: $(cd "$here/configs/accelerate" && ls *.yaml | sed 's/.yaml//' | tr '\n' ' '))"
fi
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || fail "--num-processes must be a positive integer, got '$num_processes'"

if [ "$accelerate_config" = fsdp ]; then
  # distill shards the student itself (torch FSDP2, distill/train/sharding.py) on a plain multi-process launch
  pipeline_args+=("train.sharding=fsdp")
fi
# a mistake in the config or the command line ends here, in a fraction of a second: the check loads
# no torch, which the CUDA probe and accelerate's launcher below take seconds to import
python "$here/pipelines/run.py" --check-config "${pipeline_args[@]}" || exit $?
[ -n "$accelerate_config" ] || accelerate_config=$(default_accelerate_config)
config_file="$here/configs/accelerate/$accelerate_config.yaml"
# pipelines/launch.py: a failing run ends with its one-line error and its own exit code, no launcher traceback
launch=(--config_file "$config_file" --num_processes "$num_processes")
if [ "$accelerate_config" = cpu ]; then
  if [ "$num_processes" -gt 1 ]; then
    # accelerate's --cpu launcher starts a single process; several CPU ranks go through the
    # torch launcher like GPUs do, with ACCELERATE_USE_CPU keeping them on the CPU (gloo)
    launch+=(--multi_gpu)
    export ACCELERATE_USE_CPU=true
  else
    launch+=(--cpu)
  fi
  # the cores, shared among the processes (said here, so accelerate does not warn that it guessed)
  cores=$(nproc 2>/dev/null || echo 1)
  threads=$(( cores / num_processes > 0 ? cores / num_processes : 1 ))
  launch+=(--num_cpu_threads_per_process "$threads")
fi
[ -n "${NUM_MACHINES:-}" ] && launch+=(--num_machines "$NUM_MACHINES")
[ -n "${MACHINE_RANK:-}" ] && launch+=(--machine_rank "$MACHINE_RANK")
[ -n "${MAIN_PROCESS_IP:-}" ] && launch+=(--main_process_ip "$MAIN_PROCESS_IP")
if [ -n "${MAIN_PROCESS_PORT:-}" ]; then
  launch+=(--main_process_port "$MAIN_PROCESS_PORT")
elif [ "${NUM_MACHINES:-1}" = 1 ] && [ "$num_processes" -gt 1 ]; then
  launch+=(--main_process_port 0)  # a free port: several runs on one machine never meet on the default one
fi
exec python "$here/pipelines/launch.py" "${launch[@]}" "$here/pipelines/run.py" "${pipeline_args[@]}"
