#!/usr/bin/env bash
# Installs / builds the peer proxies of the load benchmark (see bench/peers.go). Idempotent.
#
#   bench/peers/setup.sh [BIN_DIR]      (default: <repo>/.cache/bin)
#
# - squid, tinyproxy: Debian packages, apt-get installed only when missing and only as root with
#   apt-get present. apt's postinst may start them as daemons (unless /usr/sbin/policy-rc.d forbids
#   it); any daemon started by our install is stopped again, so nothing holds ports or CPU.
# - smokescreen, goproxy-basic: built from the pinned tool modules next to this script, into
#   BIN_DIR, only when not already there (delete the binary to rebuild). Builds run one after another.
# A peer that cannot be installed or built is reported and skipped; the benchmark runs with the
# others. STRICT=1 makes the script exit non-zero at the end if any peer is unavailable.
# The script never starts a service.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${1:-$REPO/.cache/bin}
mkdir -p "$BIN"
BIN=$(cd "$BIN" && pwd)
STRICT=${STRICT:-0}

say() { echo "peers/setup: $*"; }

# find_bin NAME: path of a system binary, also looking in sbin dirs that a non-root PATH may lack.
find_bin() {
	local p
	p=$(command -v "$1" 2>/dev/null) && { echo "$p"; return 0; }
	for p in /usr/sbin/"$1" /usr/bin/"$1" /usr/local/sbin/"$1" /usr/local/bin/"$1"; do
		[ -x "$p" ] && { echo "$p"; return 0; }
	done
	return 1
}

# ---- 1. Debian packages -------------------------------------------------------------------------
missing=()
for pkg in squid tinyproxy; do
	find_bin "$pkg" >/dev/null || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
		say "installing ${missing[*]} with apt-get"
		export DEBIAN_FRONTEND=noninteractive
		if apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
			# Without a policy-rc.d that forbids it, postinst starts the packaged daemons (with the
			# system config: squid on :3128, tinyproxy on :8888). Stop what our install started.
			for pkg in "${missing[@]}"; do
				case $pkg in
				squid) pidf=/run/squid.pid ;;
				tinyproxy) pidf=/run/tinyproxy/tinyproxy.pid ;;
				esac
				pid=$(cat "$pidf" 2>/dev/null || true)
				if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
					say "apt started the $pkg daemon (pid $pid); stopping it"
					service "$pkg" stop >/dev/null 2>&1 || true
					if kill -0 "$pid" 2>/dev/null; then
						kill "$pid" 2>/dev/null || true
					fi
				fi
			done
		else
			say "apt-get install ${missing[*]} FAILED"
		fi
	else
		for pkg in "${missing[@]}"; do
			find_bin "$pkg" >/dev/null ||
				say "$pkg is not installed and cannot be (needs root and apt-get): the $pkg peer will be skipped"
		done
	fi
fi

# ---- 2. Go peers (sequential: 2 cores, each build is CPU/RAM heavy) -----------------------------
# build NAME MODULE_DIR PACKAGE
build() {
	local name=$1 dir=$2 pkg=$3
	[ -x "$BIN/$name" ] && return 0
	if ! command -v go >/dev/null; then
		say "go not found: cannot build $name; the ${name%-basic} peer will be skipped"
		return 0
	fi
	say "building $name into $BIN"
	if ! (cd "$HERE/$dir" && go build -o "$BIN/$name" "$pkg"); then
		rm -f "$BIN/$name"
		say "BUILD FAILED: $name (module $HERE/$dir); the ${name%-basic} peer will be skipped"
	fi
}
build smokescreen smokescreen github.com/stripe/smokescreen
build goproxy-basic goproxy .

# ---- 3. Summary -------------------------------------------------------------------------------
# modver BINARY MODULE: version of MODULE linked into a Go binary.
modver() {
	go version -m "$1" 2>/dev/null | awk -v m="$2" '($1 == "dep" || $1 == "mod") && $2 == m { print $3; exit }'
}
avail=() skipped=()
if p=$(find_bin squid); then
	avail+=("squid $("$p" -v 2>/dev/null | head -n1 | sed -n 's/.*Version //p')")
else skipped+=(squid); fi
if p=$(find_bin tinyproxy); then
	avail+=("$("$p" -v 2>/dev/null | head -n1)")
else skipped+=(tinyproxy); fi
if [ -x "$BIN/smokescreen" ]; then
	avail+=("smokescreen $(modver "$BIN/smokescreen" github.com/stripe/smokescreen)")
else skipped+=(smokescreen); fi
if [ -x "$BIN/goproxy-basic" ]; then
	avail+=("goproxy $(modver "$BIN/goproxy-basic" github.com/elazarl/goproxy)")
else skipped+=(goproxy); fi

line="peers available: $(IFS=,; echo "${avail[*]:-none}" | sed 's/,/, /g')"
[ ${#skipped[@]} -gt 0 ] && line+="; unavailable: ${skipped[*]}"
say "$line"

if [ "$STRICT" = 1 ] && [ ${#skipped[@]} -gt 0 ]; then
	say "STRICT=1 and ${#skipped[@]} peer(s) unavailable"
	exit 1
fi
exit 0
