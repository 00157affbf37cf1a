#!/usr/bin/env bash
# Launch `python -m nftcore.train` under torchrun: one node or many, one config.
#
#   scripts/train.sh [--dry-run] [--config RECIPE|FILE.toml] [--resume latest|PATH] [--section.key=value ...]
#
# Every argument but --dry-run goes to nftcore.train unchanged (no --config: the trainer's default, the demo).
#
# One node, 8 GPUs (the default):
#   scripts/train.sh --config qwen_image_edit_r1 --run.out runs/qwen
# Several nodes: the same line on every node, with the same endpoint (a host:port every node reaches; torchrun's
# c10d rendezvous store runs there, on the node whose address it is):
#   NNODES=2 RDZV_ENDPOINT=node0:29500 RDZV_ID=job42 scripts/train.sh --config kontext_edit_r1 --resume latest
# Under Slurm, one task per node:
#   srun --ntasks-per-node=1 bash -c 'NNODES=$SLURM_NNODES RDZV_ID=$SLURM_JOB_ID \
#     RDZV_ENDPOINT=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):29500 scripts/train.sh --config ...'
#
# Environment [default]:
#   NGPU [8]              processes (GPUs) per node
#   NNODES [1]            nodes (or torchrun's MIN:MAX); more than 1 needs RDZV_ENDPOINT
#   RDZV_ENDPOINT         host:port of the c10d rendezvous
#   RDZV_ID [nftcore]     id shared by the nodes of one run (the scheduler's job id is a good one)
#   LOG_RANK [0]          local ranks whose output is shown, e.g. 0,1 (torchrun --local-ranks-filter)
#   TORCHRUN [torchrun]   the launcher, e.g. .venv/bin/torchrun
#   PYTORCH_ALLOC_CONF [expandable_segments:True]   less fragmentation with the rollout/update memory swings
# --dry-run prints the command instead of running it.
set -euo pipefail

dry_run=0
args=()
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then
    dry_run=1
  else
    args+=("$arg")
  fi
done

nnodes=${NNODES:-1}
cmd=("${TORCHRUN:-torchrun}" "--nproc-per-node=${NGPU:-8}" "--local-ranks-filter=${LOG_RANK:-0}" --tee=3)
if [ "$nnodes" = 1 ]; then
  cmd+=(--standalone)
else
  if [ -z "${RDZV_ENDPOINT:-}" ]; then
    echo "scripts/train.sh: NNODES=$nnodes needs RDZV_ENDPOINT=host:port, the c10d rendezvous every node reaches" >&2
    exit 2
  fi
  cmd+=("--nnodes=$nnodes" --rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=${RDZV_ID:-nftcore}")
fi
cmd+=(-m nftcore.train ${args[@]+"${args[@]}"})
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}

if [ "$dry_run" = 1 ]; then
  printf 'PYTORCH_ALLOC_CONF=%q' "$PYTORCH_ALLOC_CONF"
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
