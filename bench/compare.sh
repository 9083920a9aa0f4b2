#!/usr/bin/env bash
# Side-by-side micro-benchmarks of two revisions, for "no regression" claims on a shared, noisy
# machine: the test binaries of BASE and of the working tree run in turns (base, new, base, new,
# ...), so noise lands on both alike, then benchstat compares them.
#
#   bench/compare.sh BASE [PACKAGE] [BENCH-REGEXP] [ROUNDS]
#   bench/compare.sh HEAD~3 ./proxy/ 'Proxy_|Direct_' 6
set -euo pipefail
base=${1:?usage: bench/compare.sh BASE [PACKAGE] [BENCH-REGEXP] [ROUNDS]}
pkg=${2:-./proxy/}
bench=${3:-.}
rounds=${4:-6}
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/base" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

git worktree add --detach "$work/base" "$base" >/dev/null
(cd "$work/base" && go test -c -o "$work/base.test" "$pkg")
go test -c -o "$work/new.test" "$pkg"
# benchstat from the Go module proxy, pinned; built once into the Go bin directory.
benchstat=$(go env GOPATH)/bin/benchstat
[ -x "$benchstat" ] || go install golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da

pkgdir="$root/${pkg#./}"
for i in $(seq 1 "$rounds"); do
  echo "round $i/$rounds" >&2
  (cd "$work/base/${pkg#./}" && "$work/base.test" -test.run '^$' -test.bench "$bench" -test.benchmem -test.count 1) >>"$work/base.txt"
  (cd "$pkgdir" && "$work/new.test" -test.run '^$' -test.bench "$bench" -test.benchmem -test.count 1) >>"$work/new.txt"
done
"$benchstat" "base=$work/base.txt" "new=$work/new.txt"
