#!/bin/bash
# pipedni on Slurm: one task per node, torchrun starts one process per GPU (= one stage each).
# Stages are numbered node by node, so neighbouring stages share a node except at node borders.
#
#   sbatch --nodes=2 --gpus-per-node=4 launch/slurm.sh configs/mlp_fashion.yaml --train.epochs=5
#
#SBATCH --job-name=pipedni
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch launch/slurm.sh CONFIG.yaml [--section.key=value ...]}
shift
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun torchrun \
  --nnodes="$SLURM_NNODES" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$HEAD_NODE:29500" \
  -m pipedni.train "$CONFIG" --run.name="${SLURM_JOB_NAME}-${SLURM_JOB_ID}" "$@"
