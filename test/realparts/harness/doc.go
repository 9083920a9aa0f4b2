// Package harness runs the real parts escrow is tested against (a SPIRE server, agent and OIDC
// discovery provider, dex, MinIO, Vault) and the real `escrow proxy` binary, all on loopback, for the
// tests under test/realparts.
//
// The real parts are built once into a cache by test/tools/realparts.sh, which prints the
// directory; tests find them through ESCROW_REALPARTS_BIN. With it unset every test that asks
// for a real part skips with a message saying how to run it (so `go test ./...` needs none of
// them), unless ESCROW_REALPARTS_REQUIRE=1, which turns the skip into a failure (CI: `make
// test-realparts` sets both).
//
// Everything a helper starts is stopped by t.Cleanup (SIGTERM, then SIGKILL), and dies with the
// test process if that is killed (Linux). When a test fails, the tail of each process's output is
// attached to the test log. Ports are chosen by the kernel where the program can report the one it
// got (escrow), and otherwise checked free just before the program starts (SPIRE, dex, MinIO take
// a fixed address in their config).
//
// A test package that starts escrow calls Main from its TestMain, so the escrow binary built for
// the run is removed at the end:
//
//	func TestMain(m *testing.M) { harness.Main(m) }
//
// Typical use:
//
//	sp := harness.StartSPIRE(t, harness.SPIREOptions{OIDCDiscovery: true})
//	sp.CreateEntry(t, harness.Entry{SPIFFEID: "spiffe://example.org/agent", Selectors: []string{harness.UIDSelector(os.Getuid())}})
//	sp.WaitX509SVID(t, "spiffe://example.org/agent", time.Minute)
//	up := harness.StartUpstream(t, "api.example.test", handler)
//	e := harness.StartEscrow(t, harness.EscrowOptions{Config: "identity: {spiffe: {socket: " + sp.WorkloadAPI + "}}\n..."})
//	res, err := e.Client().Get("https://api.example.test/v1/x")
package harness
