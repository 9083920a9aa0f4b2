#!/usr/bin/env bash
# Builds the real parts the Kubernetes tests run (kube-apiserver and kubectl v1.34.4, helm v3.22.0)
# into a binary cache once, installs etcd from Debian when it is missing, and prints the cache dir.
#
#   test/k8s/tools.sh            # -> prints the directory to export as ESCROW_K8S_TOOLS
#
# The cache and its stamps: test/tools/lib.sh.
#
# Cold (empty Go module and build caches, 2 cores): kube-apiserver about 5-6 minutes on an idle
# machine (20 measured on a busy one), then kubectl about 1.5 and helm about 3. Warm: nothing is
# built; the script takes well under a second.
set -euo pipefail
source "$(dirname "$0")/../tools/lib.sh"
K8S_VERSION=v1.34.4

# etcd: Debian's etcd-server (3.4), the one the API server is tested against. iproute2: `ip`
# brings up loopback in the network namespace where the injected pod is simulated.
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing: ${missing[*]}: install them with apt-get and rerun"
    exit 1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
ln -sf "$(command -v etcd)" "$BIN/etcd"

VFLAGS="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34 \
 -X k8s.io/component-base/version.gitTreeState=clean"
# One after another, never in parallel.
need kube-apiserver k8s k8s.io/kubernetes/cmd/kube-apiserver "$VFLAGS"
need kubectl k8s k8s.io/kubernetes/cmd/kubectl "$VFLAGS"
# helm's default Kubernetes version (for `helm template` and `helm lint`; 1.20 unless set) is set
# at link time, as helm's release build does: 1.34, the API server these tests run.
H=helm.sh/helm/v3
need helm helm $H/cmd/helm "-X $H/internal/version.version=v3.22.0 -X $H/internal/version.gitTreeState=clean \
 -X $H/pkg/chartutil.k8sVersionMajor=1 -X $H/pkg/chartutil.k8sVersionMinor=34 \
 -X $H/pkg/lint/rules.k8sVersionMajor=1 -X $H/pkg/lint/rules.k8sVersionMinor=34"

for t in etcd kube-apiserver kubectl helm; do
  [ -x "$BIN/$t" ] || { log "missing after build: $BIN/$t"; exit 1; }
done
echo "$BIN"
