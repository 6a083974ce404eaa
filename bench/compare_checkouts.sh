#!/usr/bin/env bash
# Alternate two checkouts of the gateway under bench/run.py, round by round, so that the
# machine's slow and fast spells fall on both alike (compare pairs and medians, not runs
# taken at different times).
#
#   bench/compare_checkouts.sh OLD_DIR "OLD TARGETS" NEW_DIR "NEW TARGETS" [ROUNDS] [OUT]
#
# Each checkout runs its own bench/run.py and its own gateway code (run.py starts the
# gateway from its checkout); both use this interpreter's packages. Example, the
# settlement refactor against the commit before it, access log off on both sides:
#   git worktree add /tmp/old caab58b
#   bench/compare_checkouts.sh /tmp/old "plain redis_pg" . "plain_quiet redis_pg_quiet" 3
set -euo pipefail
old=$1 old_targets=$2 new=$3 new_targets=$4 rounds=${5:-3} out=${6:-$(mktemp -d)}
python=${PYTHON:-python3}
for i in $(seq 1 "$rounds"); do
  # shellcheck disable=SC2086 # the target lists are word lists
  (cd "$old" && "$python" bench/run.py --only $old_targets --repeat 1 --out "$out/old-$i" > "$out/old-$i.txt")
  # shellcheck disable=SC2086
  (cd "$new" && "$python" bench/run.py --only $new_targets --repeat 1 --out "$out/new-$i" > "$out/new-$i.txt")
done
for f in "$out"/old-*.txt "$out"/new-*.txt; do
  echo "== $(basename "$f" .txt)"
  grep -vE '^(written to|$)' "$f"
done
