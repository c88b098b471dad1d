#!/usr/bin/env bash
# launch.sh: start a dsdistill run on this machine, on the nodes of a hostfile, or in a SLURM allocation.
#
#   launch.sh --config run.yaml [--nodes N] [--gpus-per-node G] [--hostfile FILE]
#             [--launcher pdsh|openmpi|slurm|torchrun] [--master-addr ADDR] [--master-port PORT]
#             [--no-resume] [--dry-run] [-- extra train.py args, e.g. --set train.max_steps=100]
#
# Order of work: find the nodes -> `dsdistill check` (config, batch arithmetic for the world size, model
# paths, vocabularies, run dir, memory plan) -> write the environment every node needs -> launch.
# A failing check stops here with its one-line reason. --dry-run prints the command line of every node.
set -euo pipefail

die() { echo "launch.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TRAIN="$ROOT/dsdistill/train.py"
PYTHON=${PYTHON:-python3}
CONFIG="" NODES="" GPUS="" HOSTFILE="" LAUNCHER="" MASTER_ADDR="" MASTER_PORT=29500 DRY_RUN=0 RESUME=auto
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG=${2:?}; shift 2 ;;
    --nodes) NODES=${2:?}; shift 2 ;;
    --gpus-per-node) GPUS=${2:?}; shift 2 ;;
    --hostfile) HOSTFILE=${2:?}; shift 2 ;;
    --launcher) LAUNCHER=${2:?}; shift 2 ;;
    --master-addr) MASTER_ADDR=${2:?}; shift 2 ;;
    --master-port) MASTER_PORT=${2:?}; shift 2 ;;
    --no-resume) RESUME=never; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -f "$CONFIG" ]] || die "config file '$CONFIG' does not exist"
case "$LAUNCHER" in ""|pdsh|openmpi|slurm|torchrun) ;; *) die "--launcher '$LAUNCHER': expected pdsh, openmpi, slurm or torchrun" ;; esac
TRAIN_ARGS=(--config "$CONFIG" --set "checkpoint.resume=$RESUME" "${EXTRA[@]}")

local_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L | grep -c '^GPU' || echo 1; else echo 1; fi
}

# ---- 1. nodes, GPUs per node, master address
HOSTS=()
if [[ -z "$HOSTFILE" && -n "${SLURM_JOB_ID:-}" && ( -z "$LAUNCHER" || "$LAUNCHER" == slurm || "$LAUNCHER" == torchrun ) ]]; then
  mapfile -t HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}")
  LAUNCHER=${LAUNCHER:-slurm}
  GPUS=${GPUS:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE##*:}}}
  GPUS=${GPUS:-$(local_gpus)}
elif [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || die "hostfile '$HOSTFILE' does not exist"
  SLOTS=()
  while read -r host rest; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    slots=$(sed -n 's/.*slots=\([0-9][0-9]*\).*/\1/p' <<<"$rest")
    [[ -n "$slots" ]] || die "hostfile '$HOSTFILE': line for '$host' has no slots=N"
    HOSTS+=("$host"); SLOTS+=("$slots")
  done < "$HOSTFILE"
  [[ ${#HOSTS[@]} -gt 0 ]] || die "hostfile '$HOSTFILE' lists no hosts"
  for s in "${SLOTS[@]}"; do [[ "$s" == "${SLOTS[0]}" ]] || die "hostfile '$HOSTFILE': every host needs the same slots= (got ${SLOTS[*]})"; done
  GPUS=${GPUS:-${SLOTS[0]}}
  LAUNCHER=${LAUNCHER:-pdsh}
else
  HOSTS=("$(hostname)")
  GPUS=${GPUS:-$(local_gpus)}
  LAUNCHER=${LAUNCHER:-deepspeed}
fi
if [[ -n "$NODES" ]]; then
  [[ "$NODES" -le ${#HOSTS[@]} ]] || die "--nodes $NODES but only ${#HOSTS[@]} host(s) available: ${HOSTS[*]}"
  HOSTS=("${HOSTS[@]:0:$NODES}")
fi
NODES=${#HOSTS[@]}
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
WORLD=$((NODES * GPUS))

# ---- 2. preflight: nothing starts unless the plan is sound for this world size
"$PYTHON" -m dsdistill check --world-size "$WORLD" "${TRAIN_ARGS[@]}" || exit $?

# ---- 3. environment for every node (DeepSpeed exports the lines of DS_ENV_FILE on each node)
ENV_FILE="$ROOT/.deepspeed_env.launch"
: > "$ENV_FILE"
while IFS='=' read -r name value; do
  case "$name" in NCCL_*|HF_*|TRANSFORMERS_*|TORCH_*|CUDA_*|PYTHONPATH|DS_ACCELERATOR|OMP_NUM_THREADS) printf '%s=%s\n' "$name" "$value" >> "$ENV_FILE" ;; esac
done < <(env)
export DS_ENV_FILE="$ENV_FILE"

# ---- 4. the command per node
torchrun_cmd() {  # $1 = node rank
  echo "$PYTHON -m torch.distributed.run --nnodes $NODES --nproc_per_node $GPUS --node_rank $1" \
       "--master_addr $MASTER_ADDR --master_port $MASTER_PORT $TRAIN ${TRAIN_ARGS[*]}"
}
case "$LAUNCHER" in
  deepspeed)
    CMD=("$PYTHON" -m deepspeed.launcher.runner --num_gpus "$GPUS" --master_port "$MASTER_PORT" "$TRAIN" "${TRAIN_ARGS[@]}")
    PER_NODE=("${HOSTS[0]}: ${CMD[*]}") ;;
  pdsh|openmpi)
    CMD=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --launcher "$LAUNCHER" --num_nodes "$NODES"
         --num_gpus "$GPUS" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$TRAIN" "${TRAIN_ARGS[@]}")
    INFO=$("$PYTHON" -c 'import base64, json, sys; n = int(sys.argv[1]); hosts = sys.argv[2:]
print(base64.urlsafe_b64encode(json.dumps({h: list(range(n)) for h in hosts}).encode()).decode())' "$GPUS" "${HOSTS[@]}")
    PER_NODE=()
    for i in "${!HOSTS[@]}"; do
      PER_NODE+=("${HOSTS[$i]}: cd $PWD; $PYTHON -u -m deepspeed.launcher.launch --world_info=$INFO --node_rank=$i --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT $TRAIN ${TRAIN_ARGS[*]}")
    done ;;
  slurm)
    # one task per node; torchrun starts the GPUs' ranks on it and reads its node rank from SLURM (no ssh)
    INNER="$PYTHON -m torch.distributed.run --nnodes $NODES --nproc_per_node $GPUS --node_rank \$SLURM_NODEID --master_addr $MASTER_ADDR --master_port $MASTER_PORT $TRAIN ${TRAIN_ARGS[*]}"
    CMD=(srun --nodes "$NODES" --ntasks-per-node 1 --kill-on-bad-exit=1 --export=ALL bash -c "$INNER")
    PER_NODE=()
    for i in "${!HOSTS[@]}"; do PER_NODE+=("${HOSTS[$i]}: $(torchrun_cmd "$i")"); done ;;
  torchrun)
    read -r -a CMD <<< "$(torchrun_cmd 0)"
    PER_NODE=()
    for i in "${!HOSTS[@]}"; do PER_NODE+=("${HOSTS[$i]}: $(torchrun_cmd "$i")"); done ;;
esac

echo "launch.sh: $LAUNCHER, $NODES node(s) x $GPUS GPU(s) = world $WORLD, master $MASTER_ADDR:$MASTER_PORT, resume $RESUME"
if [[ "$DRY_RUN" == 1 ]]; then
  echo "launcher: ${CMD[*]}"
  printf 'node %s\n' "${PER_NODE[@]}"
  exit 0
fi
if [[ "$LAUNCHER" == torchrun && "$NODES" -gt 1 ]]; then
  echo "launch.sh: torchrun across nodes: run each 'node' line above on its host; starting node 0 here" >&2
fi
exec "${CMD[@]}"
