#!/usr/bin/env bash
# RWKV-4 14B on NUM_NODES x NUM_GPUS GPUs with the deepspeed launcher, no Ray. Run this script ONCE, on the first
# host of the hostfile: the launcher starts the ranks on every host over ssh (pdsh), each one running
# `python -m rwkv_dist.cli train ...` in this repo's folder with this venv's python, so the repo and its .venv must be at
# the same path on every host (a shared home, or identical clones). Environment variables the remote ranks need (NCCL_*,
# ...) go into a .deepspeed_env file (KEY=VALUE lines) in the repo or in $HOME.
#
#   cp launch/hostfile.example launch/hostfile && $EDITOR launch/hostfile
#   launch/deepspeed-hostfile.sh
#
# The launcher does not restart failed ranks; this script runs it again (up to MAX_RESTARTS times) and the trainer
# resumes from the newest committed checkpoint in OUT_DIR (--resume auto), which must be on storage every host sees.
#
# Environment (defaults in brackets):
#   HOSTFILE [launch/hostfile if present, else launch/hostfile.example]  "HOST slots=N" lines, first host = master
#   NUM_NODES [8]  NUM_GPUS [8] (per node)  MASTER_ADDR [deepspeed's choice: the first host]  MASTER_PORT [29500]
#   LAUNCHER [pdsh] (or openmpi, mvapich, slurm, ...)  MAX_RESTARTS [3]
#   CONFIG [configs/train/rwkv4-14b.yaml]  OUT_DIR [/shared/runs/rwkv4-14b]  DATA [/shared/pile/shards]
#   VENV [<repo>/.venv]  RESUME [auto]  DRY_RUN [0]: 1 prints the command instead of running it and exits 0
# Extra arguments are passed to the trainer as more key.path=value overrides, e.g. schedule.steps=1000.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${HOSTFILE:-}" ]]; then
    HOSTFILE="$REPO/launch/hostfile"
    [[ -f "$HOSTFILE" ]] || HOSTFILE="$REPO/launch/hostfile.example"
fi
NUM_NODES="${NUM_NODES:-8}"
NUM_GPUS="${NUM_GPUS:-8}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCHER="${LAUNCHER:-pdsh}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
CONFIG="${CONFIG:-configs/train/rwkv4-14b.yaml}"
OUT_DIR="${OUT_DIR:-/shared/runs/rwkv4-14b}"
DATA="${DATA:-/shared/pile/shards}"
VENV="${VENV:-$REPO/.venv}"
RESUME="${RESUME:-auto}"
DRY_RUN="${DRY_RUN:-0}"

export LAUNCH_SCRIPT=deepspeed-hostfile.sh
# shellcheck disable=SC1091  # checked on its own
source "$REPO/launch/common.bash"

for var in NUM_NODES NUM_GPUS MASTER_PORT MAX_RESTARTS; do
    [[ "${!var}" =~ ^[0-9]+$ ]] || die "$var must be a non-negative integer, got '${!var}'"
done

# the launcher takes the first NUM_NODES hosts of the hostfile: check there are that many with NUM_GPUS slots each
[[ -f "$HOSTFILE" ]] || die "no hostfile $HOSTFILE (copy launch/hostfile.example and list your nodes)"
hosts=()
while read -r host slots _ || [[ -n "${host:-}" ]]; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    [[ "$slots" =~ ^slots=([0-9]+)$ ]] || die "$HOSTFILE: bad line '$host $slots' (want: HOSTNAME slots=N)"
    if (( ${#hosts[@]} < NUM_NODES && BASH_REMATCH[1] < NUM_GPUS )); then
        die "$HOSTFILE: $host has ${BASH_REMATCH[1]} slots, NUM_GPUS is $NUM_GPUS"
    fi
    hosts+=("$host")
done < "$HOSTFILE"
(( ${#hosts[@]} >= NUM_NODES )) || die "$HOSTFILE lists ${#hosts[@]} host(s), NUM_NODES is $NUM_NODES"

cmd=("$VENV/bin/deepspeed" --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS")
if [[ -n "$MASTER_ADDR" ]]; then
    cmd+=(--master_addr "$MASTER_ADDR")
fi
cmd+=(
    --master_port "$MASTER_PORT"
    --launcher "$LAUNCHER"
    --venv_script "$VENV/bin/activate"
    --module rwkv_dist.cli train "$CONFIG"
    "out_dir=$OUT_DIR"
    "data.sources=[{location: $DATA}]"
    "data.val=$DATA"
    "$@"
    --resume "$RESUME"
)

cd "$REPO"
if [[ "$DRY_RUN" == 1 ]]; then
    echo "# $NUM_NODES node(s) x $NUM_GPUS GPU(s): ${hosts[*]:0:NUM_NODES}; from $REPO"
    show "${cmd[@]}"
    exit 0
fi

[[ -x "$VENV/bin/deepspeed" ]] || die "no $VENV/bin/deepspeed: install the project into VENV (see launch/README.md)"
export PATH="$VENV/bin:$PATH"
for (( attempt = 0; ; attempt++ )); do
    "${cmd[@]}" && exit 0
    rc=$?
    (( attempt < MAX_RESTARTS )) || exit "$rc"
    echo "deepspeed-hostfile.sh: launcher exited with $rc; restart $((attempt + 1)) of $MAX_RESTARTS in 30 s" >&2
    sleep 30
done
