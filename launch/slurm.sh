#!/bin/bash
# pipedni on Slurm: one task per node, torchrun starts one process per GPU. Processes are
# stages x dist.data_parallel replicas, numbered node by node with a replica's stages on
# neighbouring ranks, so neighbouring stages share a node except at node borders.
# DRY_RUN=1 prints the line each node would run instead of running it.
#
#   sbatch --nodes=2 --gpus-per-node=4 launch/slurm.sh configs/mlp_fashion.yaml --train.epochs=5
#
# A stage that dies (a lost node, an OOM kill) restarts every stage from the latest checkpoint,
# up to MAX_RESTARTS times (default 3); checkpoints come every CHECKPOINT_EVERY steps (default
# 500). The run directory (runs/<job name>-<job id>) must be on a shared file system. To go on
# after the job ended (time limit), submit again with --run.dir=THAT_DIR --resume.
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
NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")  # whole: `| head` would break its pipe (pipefail)
HEAD_NODE=${NODES%%$'\n'*}
MAX_RESTARTS=${MAX_RESTARTS:-3}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-500}

CMD=(srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" --rdzv_id="$SLURM_JOB_ID"
     --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:29500" --max-restarts="$MAX_RESTARTS"
     -m pipedni.train "$CONFIG" --run.name="${SLURM_JOB_NAME}-${SLURM_JOB_ID}"
     --checkpoint.every_steps="$CHECKPOINT_EVERY" "$@")
if [ -n "${DRY_RUN:-}" ]; then echo "${CMD[*]}"; else exec "${CMD[@]}"; fi
