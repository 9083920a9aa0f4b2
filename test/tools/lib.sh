# Shared by the scripts that build the tests' real parts (sourced, not run).
#
# The binary cache lives outside the repository (ESCROW_TOOLS_BIN, default
# ~/.cache/escrow-tools/bin) so that a fresh clone on the same machine reuses it. A binary is
# rebuilt when its tool module's go.mod or go.sum, its package or its link flags change (a stamp
# beside it records their hash). Builds run one after another: each one peaks at several GB and
# both cores.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${ESCROW_TOOLS_BIN:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/escrow-tools/bin}
mkdir -p "$BIN"

log() { echo "$(basename "$0"): $*" >&2; }

# The stamp: the tool module's go.mod and go.sum, the package, the link flags and (only when on)
# cgo.
stamp() { { cat "$ROOT/test/tools/$1/go.mod" "$ROOT/test/tools/$1/go.sum"; echo "$2 $3${4:+ cgo}"; } | sha256sum | cut -d' ' -f1; }

# need NAME MODULE_DIR PACKAGE [LDFLAGS]: build PACKAGE from test/tools/MODULE_DIR into $BIN/NAME
# unless it is there and was built from the same module files. Static (CGO_ENABLED=0) unless
# CGO=1 is set for the call (SPIRE server's SQLite datastore needs cgo, and so a C compiler).
need() {
  local name=$1 mod=$2 pkg=$3 ldflags=${4:-} cgo=${CGO:-}
  [ "$cgo" = 1 ] || cgo=
  local stampfile=$BIN/.$name.stamp
  if [ -x "$BIN/$name" ] && [ "$(cat "$stampfile" 2>/dev/null)" = "$(stamp "$mod" "$pkg" "$ldflags" "$cgo")" ]; then
    return 0
  fi
  log "building $name (once; cached in $BIN)"
  local start=$SECONDS
  (cd "$ROOT/test/tools/$mod" && CGO_ENABLED=${cgo:-0} GOFLAGS=-mod=mod go build -trimpath \
      -ldflags "-s -w $ldflags" -o "$BIN/$name.tmp" "$pkg")
  mv "$BIN/$name.tmp" "$BIN/$name"
  stamp "$mod" "$pkg" "$ldflags" "$cgo" > "$stampfile"
  log "built $name in $((SECONDS - start))s"
}
