#!/usr/bin/env bash
# Launch experiments.vision on one node (torchrun, one process per GPU) or on SLURM.
#
#   scripts/launch_vision.sh node  [NGPUS] [hydra overrides...]   # this machine, NGPUS (default: all)
#   scripts/launch_vision.sh slurm [NODES] [hydra overrides...]   # sbatch: NODES x 8 GPUs
#
# Examples (paper scale, DeiT-small, MultiMax):
#   scripts/launch_vision.sh node 8 experiment=deit_small_imagenet normalizer=multimax \
#       data.root=/datasets/imagenet hydra.run.dir=runs/deit_small_multimax
#   PARTITION=gpu TIME=48:00:00 scripts/launch_vision.sh slurm 1 experiment=deit_small_imagenet \
#       normalizer=multimax data.root=/datasets/imagenet hydra.run.dir=runs/deit_small_multimax
#
# Rerunning the same command (same hydra.run.dir) resumes from the run's last checkpoint,
# so a job that hit its time limit is continued by resubmitting it. Give hydra.run.dir
# explicitly: every process and every resubmission must agree on it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mode=${1:?usage: launch_vision.sh node|slurm [N] [overrides...]}
shift

case "$mode" in
  node)
    ngpus=${1:-}
    if [[ "$ngpus" =~ ^[0-9]+$ ]]; then shift; else ngpus=$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))"); fi
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$ngpus" \
      -m experiments.vision "$@"
    ;;
  slurm)
    nodes=${1:-1}
    if [[ "$nodes" =~ ^[0-9]+$ ]]; then shift; else nodes=1; fi
    gpus=${GPUS_PER_NODE:-8}
    mkdir -p "${LOG_DIR:-runs/slurm}"
    overrides=$(printf ' %q' "$@")
    sbatch --parsable <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=${JOB_NAME:-multimax-vision}
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${gpus}
#SBATCH --cpus-per-task=${CPUS_PER_TASK:-64}
#SBATCH --time=${TIME:-48:00:00}
#SBATCH --output=${LOG_DIR:-runs/slurm}/%x-%j.out
${PARTITION:+#SBATCH --partition=${PARTITION}}
${ACCOUNT:+#SBATCH --account=${ACCOUNT}}
set -euo pipefail
cd "$PWD"
export WANDB_MODE=\${WANDB_MODE:-offline}
head=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)
srun "$PY" -m torch.distributed.run --nnodes=${nodes} --nproc_per_node=${gpus} \\
  --rdzv_backend=c10d --rdzv_endpoint="\$head:29500" --rdzv_id="\$SLURM_JOB_ID" \\
  -m experiments.vision ${overrides}
SBATCH
    ;;
  *)
    echo "unknown mode '$mode' (node | slurm)" >&2
    exit 2
    ;;
esac
