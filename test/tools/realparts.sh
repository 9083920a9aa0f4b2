#!/usr/bin/env bash
# Builds the identity and credential real parts the real-parts suite runs (SPIRE server, agent and
# OIDC discovery provider v1.13.3, dex, MinIO, Vault v1.21.0) into the binary cache once and prints
# the cache dir.
#
#   test/tools/realparts.sh            # -> prints the directory to export as ESCROW_REALPARTS_BIN
#
# Cold (empty Go module and build caches, 2 cores): SPIRE about 13 minutes, MinIO about 4.5, dex
# about 2-3 on an idle machine; on one shared with other builds, 34 (the server, with cgo), 11
# (agent), 12 and 19 were measured. Warm: nothing is built; the script takes well under a second.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# The server's datastore is SQLite (go-sqlite3), which needs cgo. The agent and the discovery
# provider are built with cgo too: cgo changes the build of net, os/user and everything above
# them, so building all three the same way compiles their shared packages once on a cold machine.
CGO=1 need spire-server spire github.com/spiffe/spire/cmd/spire-server
CGO=1 need spire-agent spire github.com/spiffe/spire/cmd/spire-agent
CGO=1 need oidc-discovery-provider spire github.com/spiffe/spire/support/oidc-discovery-provider
need dex dex github.com/dexidp/dex/cmd/dex
need minio minio github.com/minio/minio
need vault vault github.com/hashicorp/vault

for t in spire-server spire-agent oidc-discovery-provider dex minio vault; do
  [ -x "$BIN/$t" ] || { log "missing after build: $BIN/$t"; exit 1; }
done
echo "$BIN"
