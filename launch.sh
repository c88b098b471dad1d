#!/usr/bin/env bash
# launch.sh: start a dsdistill run on this machine, on the nodes of a hostfile, or in a SLURM allocation.
#
#   launch.sh --config run.yaml [--nodes N] [--gpus-per-node G] [--hostfile FILE]
#             [--launcher local|deepspeed|pdsh|openmpi|slurm|torchrun] [--master-addr ADDR] [--master-port PORT]
#             [--export NAME]... [--env-file FILE] [--kill-after SECONDS]
#             [--no-resume] [--dry-run] [-- extra train.py args, e.g. --set train.max_steps=100]
#   PYTHON=/path/to/python picks the interpreter (default: this project's .venv, else python3)
#
# Order of work: find the nodes -> `dsdistill check` (config, batch arithmetic for the world size, model
# paths, vocabularies, run dir, memory plan) -> write the environment every node needs -> launch.
# A failing check stops here with its one-line reason. --dry-run prints the command line of every node.
# A stop (Ctrl-C, SIGTERM to this script or its process group, SLURM preemption) finishes the micro-batch in
# flight, saves a checkpoint and exits 75; launch again to resume.
set -euo pipefail

die() { echo "launch.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; printf '%s' "${out% }"; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TRAIN="$ROOT/dsdistill/train.py"
# the interpreter: $PYTHON if set, else the project's own .venv (what `make install` made), else an
# activated environment's python3; one that cannot import dsdistill and its dependencies is refused in one line
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# (found, not imported: importing them costs seconds, and the check below imports them anyway)
"$PYTHON" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "deepspeed", "dsdistill")))' 2>/dev/null \
  || die "'$PYTHON' cannot import torch, deepspeed and dsdistill; run 'make install' (it makes $ROOT/.venv), activate the environment you installed into, or set PYTHON=/path/to/its/python"
CONFIG="" NODES="" GPUS="" HOSTFILE="" LAUNCHER="" MASTER_ADDR="" MASTER_PORT=29500 DRY_RUN=0 RESUME=auto
USER_ENV_FILE="" KILL_AFTER=0
EXPORTS=() EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG=${2:?}; shift 2 ;;
    --nodes) NODES=${2:?}; shift 2 ;;
    --gpus-per-node) GPUS=${2:?}; shift 2 ;;
    --hostfile) HOSTFILE=${2:?}; shift 2 ;;
    --launcher) LAUNCHER=${2:?}; shift 2 ;;
    --master-addr) MASTER_ADDR=${2:?}; shift 2 ;;
    --master-port) MASTER_PORT=${2:?}; shift 2 ;;
    --export) EXPORTS+=("${2:?}"); shift 2 ;;
    --env-file) USER_ENV_FILE=${2:?}; shift 2 ;;
    --kill-after) KILL_AFTER=${2:?}; shift 2 ;;
    --no-resume) RESUME=never; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -f "$CONFIG" ]] || die "config file '$CONFIG' does not exist"
case "$LAUNCHER" in ""|local|deepspeed|pdsh|openmpi|slurm|torchrun) ;; *) die "--launcher '$LAUNCHER': expected local, deepspeed, pdsh, openmpi, slurm or torchrun" ;; esac
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "--master-port '$MASTER_PORT': expected a port number"
[[ -z "$GPUS" || "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node '$GPUS': expected a positive integer"
[[ -z "$NODES" || "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes '$NODES': expected a positive integer"
[[ "$KILL_AFTER" =~ ^[0-9]+$ ]] || die "--kill-after '$KILL_AFTER': expected whole seconds"
[[ -z "$USER_ENV_FILE" || -f "$USER_ENV_FILE" ]] || die "--env-file '$USER_ENV_FILE' does not exist"
for name in ${EXPORTS[@]+"${EXPORTS[@]}"}; do
  [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--export '$name': expected a variable name"
done
TRAIN_ARGS=(--config "$CONFIG" --set "checkpoint.resume=$RESUME" ${EXTRA[@]+"${EXTRA[@]}"})

local_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L | grep -c '^GPU' || echo 1; else echo 1; fi
}

# ---- 1. nodes, GPUs per node, master address
HOSTS=()
if [[ -z "$HOSTFILE" && -n "${SLURM_JOB_ID:-}" && ( -z "$LAUNCHER" || "$LAUNCHER" == slurm || "$LAUNCHER" == torchrun ) ]]; then
  [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "inside SLURM job ${SLURM_JOB_ID} but SLURM_JOB_NODELIST is not set; run from sbatch/salloc, or pass --hostfile"
  command -v scontrol >/dev/null 2>&1 || die "inside SLURM job ${SLURM_JOB_ID} but 'scontrol' is not on PATH; it expands the node list '${SLURM_JOB_NODELIST}' (load your site's slurm module, or pass --hostfile)"
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  [[ ${#HOSTS[@]} -gt 0 ]] || die "'scontrol show hostnames $SLURM_JOB_NODELIST' listed no hosts"
  LAUNCHER=${LAUNCHER:-slurm}
  GPUS=${GPUS:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE##*:}}}
  GPUS=${GPUS:-$(local_gpus)}
elif [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || die "hostfile '$HOSTFILE' does not exist"
  SLOTS=()
  while read -r host rest; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    [[ "$host" =~ ^[A-Za-z0-9._-]+$ ]] || die "hostfile '$HOSTFILE': '$host' is not a host name"
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
  LAUNCHER=${LAUNCHER:-local}
fi
if [[ -n "$NODES" ]]; then
  [[ "$NODES" -le ${#HOSTS[@]} ]] || die "--nodes $NODES but only ${#HOSTS[@]} host(s) available: ${HOSTS[*]}"
  HOSTS=("${HOSTS[@]:0:$NODES}")
fi
NODES=${#HOSTS[@]}
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
WORLD=$((NODES * GPUS))

# ---- 2. preflight: nothing starts unless the plan is sound for this world size
PLAN_JSON=$(mktemp "${TMPDIR:-/tmp}/dsdistill-plan.XXXXXX") || die "cannot create a temporary file for the plan"
"$PYTHON" -m dsdistill check --world-size "$WORLD" --json-to "$PLAN_JSON" "${TRAIN_ARGS[@]}" || { rc=$?; rm -f "$PLAN_JSON"; exit "$rc"; }
RUN_DIR=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["run_dir"])' "$PLAN_JSON")
rm -f "$PLAN_JSON"
[[ -n "$RUN_DIR" ]] || die "dsdistill check wrote no run dir to its plan"
mkdir -p -- "$RUN_DIR" || die "cannot create the run dir '$RUN_DIR'"  # check leaves no trace; the launch makes it

# ---- 3. environment for the nodes of a hostfile launch (SLURM and local ranks inherit this one): written
# into the run directory with mode 0600, only the variables ranks need; credentials travel only when
# named with --export or given in --env-file
ENV_FILE="$RUN_DIR/.deepspeed_env"
write_env_file() {
  local name value
  (umask 077; : > "$ENV_FILE")
  while IFS= read -r name; do
    case "$name" in
      *TOKEN*|*SECRET*|*PASSWORD*|*_KEY|*CREDENTIAL*) continue ;;
      NCCL_*|HF_*|TRANSFORMERS_*|TORCH_*|CUDA_VISIBLE_DEVICES|PYTHONPATH|DS_ACCELERATOR|OMP_NUM_THREADS) ;;
      *) continue ;;
    esac
    value=${!name}
    [[ "$value" == *$'\n'* ]] || printf '%s=%s\n' "$name" "$value" >> "$ENV_FILE"
  done < <(compgen -e)
  for name in ${EXPORTS[@]+"${EXPORTS[@]}"}; do
    [[ -n "${!name+set}" ]] || die "--export $name: the variable is not set"
    printf '%s=%s\n' "$name" "${!name}" >> "$ENV_FILE"
  done
  if [[ -n "$USER_ENV_FILE" ]]; then grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$USER_ENV_FILE" >> "$ENV_FILE" || true; fi
  chmod 600 "$ENV_FILE"
}

# ---- 4. the command per node
PER_NODE=()
KILL=()
[[ "$KILL_AFTER" == 0 ]] || KILL=(--kill-after "$KILL_AFTER")
NODE_PRE=("$PYTHON" -m dsdistill.launcher --nnodes "$NODES" --nproc-per-node "$GPUS")
NODE_POST=(--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" ${KILL[@]+"${KILL[@]}"} "$TRAIN" "${TRAIN_ARGS[@]}")
node_launcher() {  # $1 = node rank: the preemption-safe per-node launcher
  NODE_CMD=("${NODE_PRE[@]}" --node-rank "$1" "${NODE_POST[@]}")
}
torchrun_cmd() {  # $1 = node rank
  NODE_CMD=("$PYTHON" -m torch.distributed.run --nnodes "$NODES" --nproc_per_node "$GPUS" --node_rank "$1"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$TRAIN" "${TRAIN_ARGS[@]}")
}
case "$LAUNCHER" in
  local)
    node_launcher 0
    CMD=("${NODE_CMD[@]}")
    PER_NODE=("${HOSTS[0]}: $(quote "${CMD[@]}")") ;;
  deepspeed)
    CMD=("$PYTHON" -m deepspeed.launcher.runner --num_gpus "$GPUS" --master_port "$MASTER_PORT" "$TRAIN" "${TRAIN_ARGS[@]}")
    PER_NODE=("${HOSTS[0]}: $(quote "${CMD[@]}")") ;;
  pdsh|openmpi)
    # DeepSpeed's multi-node runner exports the lines of DS_ENV_FILE on every node
    export DS_ENV_FILE="$ENV_FILE"
    CMD=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --launcher "$LAUNCHER" --num_nodes "$NODES"
         --num_gpus "$GPUS" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$TRAIN" "${TRAIN_ARGS[@]}")
    INFO=$("$PYTHON" -c 'import base64, json, sys; n = int(sys.argv[1]); hosts = sys.argv[2:]
print(base64.urlsafe_b64encode(json.dumps({h: list(range(n)) for h in hosts}).encode()).decode())' "$GPUS" "${HOSTS[@]}")
    for i in "${!HOSTS[@]}"; do
      PER_NODE+=("${HOSTS[$i]}: cd $(quote "$PWD"); $(quote "$PYTHON" -u -m deepspeed.launcher.launch "--world_info=$INFO" "--node_rank=$i" "--master_addr=$MASTER_ADDR" "--master_port=$MASTER_PORT" "$TRAIN" "${TRAIN_ARGS[@]}")")
    done ;;
  slurm)
    # one task per node; each runs the per-node launcher with its node rank from SLURM (no ssh). The
    # launcher line is quoted for the inner shell, so no argument can split or run as a command there.
    INNER="exec $(quote "${NODE_PRE[@]}") --node-rank \"\$SLURM_NODEID\" $(quote "${NODE_POST[@]}")"
    CMD=(srun --nodes "$NODES" --ntasks-per-node 1 --kill-on-bad-exit=1 --export=ALL bash -c "$INNER")
    for i in "${!HOSTS[@]}"; do node_launcher "$i"; PER_NODE+=("${HOSTS[$i]}: $(quote "${NODE_CMD[@]}")"); done ;;
  torchrun)
    torchrun_cmd 0
    CMD=("${NODE_CMD[@]}")
    for i in "${!HOSTS[@]}"; do torchrun_cmd "$i"; PER_NODE+=("${HOSTS[$i]}: $(quote "${NODE_CMD[@]}")"); done ;;
esac

echo "launch.sh: $LAUNCHER, $NODES node(s) x $GPUS GPU(s) = world $WORLD, master $MASTER_ADDR:$MASTER_PORT, resume $RESUME"
if [[ "$DRY_RUN" == 1 ]]; then
  echo "launcher: $(quote "${CMD[@]}")"
  printf 'node %s\n' "${PER_NODE[@]}"
  exit 0
fi
if [[ "$LAUNCHER" == pdsh || "$LAUNCHER" == openmpi ]]; then write_env_file; fi
if [[ "$LAUNCHER" == torchrun && "$NODES" -gt 1 ]]; then
  echo "launch.sh: torchrun across nodes: run each 'node' line above on its host; starting node 0 here" >&2
fi
# exec: the launcher takes this script's PID, so a signal to it (or to the group) reaches the launcher
# directly and its exit status (75 after a preemption) is this command's
exec "${CMD[@]}"
