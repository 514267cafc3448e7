#!/bin/sh
# The trainer service: train course models, then export them into the model repository the server
# polls. The server picks a new version up on its next poll (COURSEZOO_POLL_INTERVAL_S), no restart:
# export writes each version into a hidden staging folder and renames it into place.
#
# Settings (environment, defaults from the trainer image):
#   COURSEZOO_MODELS       catalogue names separated by spaces, or "all"            [all]
#   COURSEZOO_TRAIN_ARGS   extra `coursezoo train` flags, e.g. "--seed 7 --device cpu"    []
#   COURSEZOO_RUNS         checkpoints and training reports (a volume)               [/runs]
#   COURSEZOO_EXPORT_DIR   the model repository (./exported, mounted read-write)     [/models]
#   COURSEZOO_DATA_ROOT / COURSEZOO_DATA_MIRROR   where the data sets are / come from
#
# A model that misses its quality bar makes `coursezoo train` exit non-zero (unless its settings were
# overridden), and `coursezoo export` refuses it in any case: a worse model must not reach the server
# unnoticed. Each model goes on its own: one that fails to train or export does not hold back the others
# (a run export already published is left as it is, no new version), and the job then exits 1.
set -eu

models=${COURSEZOO_MODELS:-all}
runs=${COURSEZOO_RUNS:-/runs}
out=${COURSEZOO_EXPORT_DIR:-/models}

# $models and $COURSEZOO_TRAIN_ARGS are word lists on purpose (several names, several flags).
status=0
# shellcheck disable=SC2086
coursezoo train $models --runs "$runs" ${COURSEZOO_TRAIN_ARGS:-} || status=1
# shellcheck disable=SC2086
coursezoo export $models --runs "$runs" --repo "$out" || status=1
exit $status
