#!/usr/bin/env bash
# Launch a language-modelling or translation run on a GPU node or under SLURM.
#
#   scripts/launch_fairseq.sh language_model experiment=lm_wikitext103 normalizer=multimax
#   scripts/launch_fairseq.sh translation experiment=mt_iwslt14_deen normalizer=softmax
#
# One GPU node: runs the Hydra app once; fairseq itself starts one worker per visible GPU
# (CUDA_VISIBLE_DEVICES chooses them). Inside a SLURM allocation (sbatch this script, e.g.
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64 \
#          --time=48:00:00 scripts/launch_fairseq.sh language_model experiment=lm_wikitext103
# ) srun starts the app once per node; fairseq reads SLURM's variables, meets on
# distributed.port and starts one worker per GPU of each node. The run directory is fixed
# per job (runs/<task>/slurm-<jobid>) so every node writes to the same place, and
# resubmitting with RUN_DIR=<that dir> resumes from its checkpoints/checkpoint_last.pt.
# Sweeps over normalisers / seeds go through Hydra's submitit launcher instead
# (launcher=slurm, configs/launcher/slurm.yaml), one job per point.
set -euo pipefail
cd "$(dirname "$0")/.."

app="${1:?usage: scripts/launch_fairseq.sh language_model|translation [hydra overrides...]}"
shift
case "$app" in
  language_model|translation) ;;
  *) echo "unknown app '$app' (language_model or translation)" >&2; exit 2 ;;
esac
PY="${PYTHON:-.venv/bin/python}"
export WANDB_MODE="${WANDB_MODE:-offline}"

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  run_dir="${RUN_DIR:-runs/${app}/slurm-${SLURM_JOB_ID}}"
  nodes="${SLURM_NNODES:-1}"
  echo "[launch] SLURM job ${SLURM_JOB_ID}: ${nodes} node(s), run dir ${run_dir}"
  exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$PY" -m "experiments.${app}" "hydra.run.dir=${run_dir}" "$@"
fi

run_dir="${RUN_DIR:-}"
if [[ -n "$run_dir" ]]; then
  exec "$PY" -m "experiments.${app}" "hydra.run.dir=${run_dir}" "$@"
fi
exec "$PY" -m "experiments.${app}" "$@"
