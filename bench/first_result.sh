#!/usr/bin/env bash
# Time from `git clone` to the first result, as a newcomer (or an agent given only the skill folder) gets it:
#   1. clone;  2. the first command of SKILL.md's workflow (`detect`) from the bare copy, no install;
#   3. the one-line bootstrap (`make install`: a venv, torch's CPU build, `pip install -e .`);  4. a first
#   technique result (`mechscope heads --json`) on the bundled model.
# Usage: bash bench/first_result.sh [REPO_URL_OR_PATH]   (default: this checkout). Prints one line per step.
set -euo pipefail
src="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1
t0=$(date +%s.%N)
step() { printf '%-58s %7.1f s\n' "$1" "$(echo "$(date +%s.%N) - $t0" | bc)"; }
git clone --quiet "$src" "$work/mechscope"
step "git clone"
cd "$work/mechscope"
python3 scripts/detect_compute.py --json >/dev/null
step "+ python3 scripts/detect_compute.py --json (no install)"
make --quiet install >/dev/null
step "+ make install (venv, torch CPU build, pip install -e .)"
.venv/bin/mechscope heads --json --out "$work/runs" >/dev/null
step "+ mechscope heads --json (first technique result)"
echo "cores: $(nproc); python: $(python3 --version 2>&1); pip cache: $(du -sh "$(python3 -m pip cache dir)" 2>/dev/null | cut -f1)"
