#!/usr/bin/env bash
# Start the knowledge-retention driver in the background: niced, one torch thread, appending to <out>.log
# (outputs/knowledge_retention.log by default; a second driver beside the first needs its own --out, and a
# group-switch item runs in the --out that holds its trained model). It runs a snapshot of the committed code (git
# archive of HEAD under /tmp), so rebasing or editing the worktree cannot change what a running driver imports
# later. The data sets are read from $LORAMOE_DATA_DIR (default: ../shared/data beside the repository, where this
# project's machines keep their local copies). Extra arguments go to run.py.
set -euo pipefail
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
sha=$(git -C "$repo" rev-parse --short HEAD)
snap=/tmp/knowledge-retention-snapshot/$sha
if [ ! -d "$snap/repo" ]; then
    mkdir -p "$snap/repo"
    git -C "$repo" archive HEAD | tar -x -C "$snap/repo"
fi
data=${LORAMOE_DATA_DIR:-$(realpath -m "$repo/../shared/data")}
[ -d "$data" ] || { echo "no data directory $data: set LORAMOE_DATA_DIR to the local copies of the data sets" >&2; exit 2; }
py=${PYTHON:-$repo/.venv/bin/python}
[ -x "$py" ] || py=/work/main/.venv/bin/python
out=$repo/outputs/knowledge_retention
prev=
for arg in "$@"; do  # run.py takes the last --out given
    [ "$prev" = --out ] && out=$(realpath -m "$arg")
    prev=$arg
done
mkdir -p "$(dirname "$out")"
# Its own session, hence its own scheduler autogroup: with autogroups on (most Linux desktops and these machines),
# nice only ranks processes inside one session, so a driver niced in a shell shares the CPU with every other session's
# test run as one equal group. KR_PRIORITY (-20..19) sets the autogroup's nice; negative gives the driver priority.
LORAMOE_DATA_DIR="$data" PYTHONPATH="$snap/repo/src" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 \
    setsid nohup nice -n 10 "$py" "$snap/repo/experiments/knowledge_retention/run.py" --threads 1 \
    --out "$out" --results "$repo/experiments/knowledge_retention/results" "$@" >> "$out.log" 2>&1 &
pid=$!
if [ -n "${KR_PRIORITY:-}" ]; then
    sleep 1
    echo "$KR_PRIORITY" > "/proc/$pid/autogroup" 2>/dev/null || echo "could not set the autogroup priority (needs root or CAP_SYS_NICE)" >&2
fi
echo "driver pid $pid (code $sha); log: $out.log"
