#!/usr/bin/env bash
# The policy protocol on an accelerator machine, in one command:
#
#     bash scripts/device-protocol.sh OUT [SIZE]       # SIZE: gpu (default), cpu, tiny
#
# Runs from a plain checkout with only torch, numpy and tqdm installed (nothing is installed,
# no package index is needed): the package is staged as it would be installed (models/ and
# inference/ under latentsel/, as setup.cfg maps them) in a temporary folder on PYTHONPATH.
# SFT, RL atomic, RL compound, evaluation and corpora run within BUDGET seconds (default 480),
# and everything is packed into at most 8 files under OUT (see latentsel/policy/device.py).
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 OUT [gpu|cpu|tiny]" >&2
    exit 2
fi
OUT=$1
SIZE=${2:-gpu}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-480}

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/latentsel-stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir "$STAGE/latentsel"
for entry in "$ROOT"/latentsel/*; do
    ln -s "$entry" "$STAGE/latentsel/$(basename "$entry")"
done
ln -s "$ROOT/models" "$STAGE/latentsel/models"
ln -s "$ROOT/inference" "$STAGE/latentsel/inference"

export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
# "python -m" would put the current folder first on sys.path, and from the checkout's root that
# is ./latentsel, without models/ and inference/: keep it off (Python >= 3.11)
export PYTHONSAFEPATH=1
"$PYTHON" -m latentsel.policy.device "$OUT" --size "$SIZE" --budget "$BUDGET"
