#!/usr/bin/env bash
# RWKV-4 14B on NNODES x NPROC_PER_NODE GPUs with torchrun, no Ray. Run this script once on EVERY node (same
# command, only NODE_RANK differs), e.g. with pdsh, clush or by hand in tmux:
#
#   NODE_RANK=0 MASTER_ADDR=node01 launch/torchrun-multinode.sh      # on node01
#   NODE_RANK=1 MASTER_ADDR=node01 launch/torchrun-multinode.sh      # on node02 ... up to NODE_RANK=7
#
# torchrun meets the other nodes at MASTER_ADDR:MASTER_PORT (c10d rendezvous, hosted by the node whose address that
# is; it hands out the ranks, so NODE_RANK is only checked and logged) and starts NPROC_PER_NODE trainer ranks here.
# RDZV_BACKEND=static uses fixed ranks instead: node NODE_RANK gets ranks NODE_RANK*NPROC_PER_NODE and up. When a rank dies, torchrun restarts the whole group (up to
# MAX_RESTARTS times) and the trainer resumes from the newest committed checkpoint in OUT_DIR (--resume auto), which
# must therefore be on storage every node sees (NFS, Lustre, FSx, Filestore...).
#
# Environment (defaults in brackets):
#   NNODES [8]  NODE_RANK [0]  MASTER_ADDR [node01]  MASTER_PORT [29500]  NPROC_PER_NODE [8]  MAX_RESTARTS [3]
#   RDZV_BACKEND [c10d] (or static)  RDZV_ID [rwkv4-14b]: same on every node, new for each separate run
#   CONFIG [configs/train/rwkv4-14b.yaml]  OUT_DIR [/shared/runs/rwkv4-14b]  DATA [/shared/pile/shards]
#   VENV [<repo>/.venv]   the same path on every node
#   RESUME [auto]         auto (newest committed checkpoint in OUT_DIR), none, or a step folder
#   DRY_RUN [0]           1: print the command instead of running it, exit 0
# Extra arguments are passed to the trainer as more key.path=value overrides, e.g. schedule.steps=1000.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NNODES="${NNODES:-8}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-node01}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
RDZV_ID="${RDZV_ID:-rwkv4-14b}"
CONFIG="${CONFIG:-configs/train/rwkv4-14b.yaml}"
OUT_DIR="${OUT_DIR:-/shared/runs/rwkv4-14b}"
DATA="${DATA:-/shared/pile/shards}"
VENV="${VENV:-$REPO/.venv}"
RESUME="${RESUME:-auto}"
DRY_RUN="${DRY_RUN:-0}"

export LAUNCH_SCRIPT=torchrun-multinode.sh
# shellcheck disable=SC1091  # checked on its own
source "$REPO/launch/common.bash"

for var in NNODES NODE_RANK MASTER_PORT NPROC_PER_NODE MAX_RESTARTS; do
    [[ "${!var}" =~ ^[0-9]+$ ]] || die "$var must be a non-negative integer, got '${!var}'"
done
(( NODE_RANK < NNODES )) || die "NODE_RANK ($NODE_RANK) must be below NNODES ($NNODES)"

case "$RDZV_BACKEND" in
    c10d) rdzv=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID") ;;
    static) rdzv=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT") ;;
    *) die "RDZV_BACKEND must be c10d or static, got '$RDZV_BACKEND'" ;;
esac

cmd=(
    "$VENV/bin/torchrun"
    --nnodes "$NNODES"
    --nproc_per_node "$NPROC_PER_NODE"
    "${rdzv[@]}"
    --max_restarts "$MAX_RESTARTS"
    -m rwkv_dist.cli train "$CONFIG"
    "out_dir=$OUT_DIR"
    "data.sources=[{location: $DATA}]"
    "data.val=$DATA"
    "$@"
    --resume "$RESUME"
)

cd "$REPO"
if [[ "$DRY_RUN" == 1 ]]; then
    echo "# node $NODE_RANK of $NNODES, in $REPO"
    show "${cmd[@]}"
    exit 0
fi

[[ -x "$VENV/bin/torchrun" ]] || die "no $VENV/bin/torchrun: install the project into VENV (see launch/README.md)"
# the WKV CUDA kernel is JIT-built with the venv's ninja
export PATH="$VENV/bin:$PATH"
exec "${cmd[@]}"
