#!/usr/bin/env bash
# Time from `git clone` to the first result, for an agent given only the skill folder:
#   1. git clone;  2. a bare copy of the skill folder (skills/mechscope, links followed);
#   3. its first command, `detect`, with no install;  4. the one-line bootstrap in a new venv
#      (`pip install -e <skill folder>`, after torch's CPU build);  5. a first technique result
#      (`mechscope heads --json`) on the bundled model.
# Usage: bash bench/first_result.sh [REPO_URL_OR_PATH]   (default: this checkout's last commit).
set -euo pipefail
src="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1
t0=$(date +%s.%N)
step() { printf '%-64s %7.1f s\n' "$1" "$(echo "$(date +%s.%N) - $t0" | bc)"; }
git clone --quiet "$src" "$work/clone"
step "git clone"
cp -rL "$work/clone/skills/mechscope" "$work/mechscope"
cd "$work/mechscope"
step "+ cp -rL skills/mechscope (the bare skill folder)"
python3 scripts/detect_compute.py --json >/dev/null
step "+ python3 scripts/detect_compute.py --json (no install)"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "torch==2.13.0" 2>/dev/null
"$work/venv/bin/python" -m pip install --quiet -e "$work/mechscope" 2>/dev/null
step "+ venv, torch CPU build, pip install -e <skill folder>"
"$work/venv/bin/python" scripts/heads.py --json --out "$work/runs" >/dev/null
step "+ python scripts/heads.py --json (first technique result)"
echo "cores: $(nproc); load before: $(cut -d' ' -f1-3 /proc/loadavg); $(python3 --version 2>&1)"
