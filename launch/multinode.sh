#!/bin/bash
# pipedni on two machines without a scheduler: run this on each node with NODE_RANK=0 and 1.
# Every node needs the same code, config and data.root; run.dir should be on a shared
# file system (each stage writes its own metrics and checkpoint files there).
#
#   HEAD=10.0.0.1 NODE_RANK=0 NPROC=4 bash launch/multinode.sh configs/mlp_fashion.yaml   # on node 0
#   HEAD=10.0.0.1 NODE_RANK=1 NPROC=4 bash launch/multinode.sh configs/mlp_fashion.yaml   # on node 1
#
# The config must describe NNODES * NPROC stages (e.g. partition.balance with 8 entries).
set -euo pipefail

CONFIG=${1:?usage: HEAD=host NODE_RANK=i [NNODES=2] [NPROC=gpus] bash launch/multinode.sh CONFIG.yaml [overrides]}
shift
: "${HEAD:?set HEAD to the address of node 0}"
: "${NODE_RANK:?set NODE_RANK to the index of this node}"
NNODES=${NNODES:-2}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}

exec torchrun \
  --nnodes="$NNODES" \
  --node_rank="$NODE_RANK" \
  --nproc_per_node="$NPROC" \
  --rdzv_id="pipedni-${RUN_ID:-0}" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$HEAD:29500" \
  -m pipedni.train "$CONFIG" "$@"
