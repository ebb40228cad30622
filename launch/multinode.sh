#!/bin/bash
# pipedni on several machines without a scheduler: run this on each node with NODE_RANK=0, 1, ...
# Every node needs the same code, config and data.root; run.dir should be on a shared file
# system (each stage writes its own metrics and checkpoint files there).
#
#   HEAD=10.0.0.1 NODE_RANK=0 NPROC=4 bash launch/multinode.sh configs/mlp_fashion.yaml   # on node 0
#   HEAD=10.0.0.1 NODE_RANK=1 NPROC=4 bash launch/multinode.sh configs/mlp_fashion.yaml   # on node 1
#
# Global rank = NODE_RANK * NPROC + local rank; stage = global rank mod stages, replica = global
# rank div stages (dist.data_parallel: NNODES * NPROC = stages x replicas, a replica's stages on
# neighbouring ranks). The static rendezvous (--master_addr and --node_rank) keeps that placement
# fixed; a c10d rendezvous would number nodes in the order they join, so stage 0 could land on
# any node. DRY_RUN=1 prints the torchrun line instead of running it.
set -euo pipefail

CONFIG=${1:?usage: HEAD=host NODE_RANK=i [NNODES=2] [NPROC=gpus] bash launch/multinode.sh CONFIG.yaml [overrides]}
shift
: "${HEAD:?set HEAD to the address of node 0}"
: "${NODE_RANK:?set NODE_RANK to the index of this node}"
NNODES=${NNODES:-2}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}

CMD=(torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC"
     --master_addr="$HEAD" --master_port="${PORT:-29500}" -m pipedni.train "$CONFIG" "$@")
if [ -n "${DRY_RUN:-}" ]; then echo "${CMD[*]}"; else exec "${CMD[@]}"; fi
