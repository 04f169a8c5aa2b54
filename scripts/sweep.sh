#!/usr/bin/env bash
# The paper grid of one table (normalisers x models x seeds) as ONE Hydra multirun, then its
# tables from the runs.
#
#   scripts/sweep.sh TABLE [HYDRA_OVERRIDE...]
#
#   TABLE: imagenet | wikitext103 | iwslt14 | wmt14 | mechanism (registry.sweep of configs/experiment/*.yaml)
#   Environment (defaults in brackets):
#     NORMALIZERS  comma list of configs/normalizer/ names [softmax,sparsemax,entmax15,evsoftmax,multimax]
#     SEEDS        comma list                                [0,1,2]
#     PROFILE      paper | smoke                             [paper]
#     EXPERIMENTS  comma list of configs/experiment/ names   [the table's models]
#     SWEEP_ROOT   where sweeps go                           [runs/sweeps]
#     SWEEP_DIR    this sweep's directory                    [$SWEEP_ROOT/<TABLE>_<PROFILE>_<time>]
#     TABLES_OUT   where make_tables writes                  [results (paper), results/smoke (smoke)]
#     PYTHON       interpreter                               [.venv/bin/python if present, else python]
#     DRY=1        print the command, run nothing
#
# Locally (Hydra's basic launcher, one run after another):
#   PROFILE=smoke SEEDS=0,1 scripts/sweep.sh iwslt14
# On a SLURM cluster (Hydra's submitit launcher, one job per grid point; this process waits
# for the jobs, so start it inside tmux/screen on the login node):
#   scripts/sweep.sh imagenet launcher=slurm hydra.launcher.partition=gpu hydra.launcher.timeout_min=4320
# Any other Hydra override is passed through (logger=none, model.output_normalizer=softmax, ...).
# After the sweep, scripts/make_tables.py reads every run under $SWEEP_ROOT, so the tables of
# all sweeps so far are regenerated together.
set -euo pipefail

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  exit 2
fi
TABLE=$1
shift

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

# The table's app and experiments come from the experiment registry (configs/experiment/*.yaml).
if ! SPEC=$("$PYTHON" -m experiments.core.registry sweep "$TABLE"); then
  echo "sweep.sh: see configs/experiment/*.yaml (registry.sweep) for the tables" >&2
  exit 2
fi
read -r APP_NAME DEFAULT_EXPERIMENTS <<<"$SPEC"
APP=experiments.$APP_NAME

NORMALIZERS=${NORMALIZERS:-softmax,sparsemax,entmax15,evsoftmax,multimax}
SEEDS=${SEEDS:-0,1,2}
PROFILE=${PROFILE:-paper}
EXPERIMENTS=${EXPERIMENTS:-$DEFAULT_EXPERIMENTS}
SWEEP_ROOT=${SWEEP_ROOT:-runs/sweeps}
SWEEP_DIR=${SWEEP_DIR:-$SWEEP_ROOT/${TABLE}_${PROFILE}_$(date +%Y-%m-%d_%H-%M-%S)}
if [[ "$PROFILE" == "paper" ]]; then TABLES_OUT=${TABLES_OUT:-results}; else TABLES_OUT=${TABLES_OUT:-results/$PROFILE}; fi
export WANDB_MODE=${WANDB_MODE:-offline}

APP_FILE=${APP//./\/}.py
if [[ ! -f "$APP_FILE" ]]; then
  echo "sweep.sh: $APP_FILE is not in this checkout yet; the '$TABLE' sweep cannot run" >&2
  exit 3
fi

CMD=("$PYTHON" -m "$APP" --multirun
  "experiment=$EXPERIMENTS" "normalizer=$NORMALIZERS" "seed=$SEEDS" "profile=$PROFILE"
  "hydra.sweep.dir=$SWEEP_DIR" "$@")
TABLES=("$PYTHON" scripts/make_tables.py "$SWEEP_ROOT" --out "$TABLES_OUT")

echo "+ ${CMD[*]}"
echo "+ ${TABLES[*]}"
if [[ "${DRY:-0}" == "1" ]]; then
  exit 0
fi
"${CMD[@]}"
"${TABLES[@]}"
echo "sweep.sh: runs in $SWEEP_DIR, tables in $TABLES_OUT/"
if [[ "$WANDB_MODE" == "offline" ]]; then
  echo "sweep.sh: W&B runs are offline; upload them with: wandb sync $SWEEP_DIR/*/wandb/offline-run-*"
fi
