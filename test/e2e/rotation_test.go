package e2e

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestStaticFileCredential runs escrow with a credential file that does not exist yet, then
// appears, then is rotated (atomically replaced, as a Kubernetes Secret volume does): escrow
// fails closed while it has no secret and follows the file without a restart.
func TestStaticFileCredential(t *testing.T) {
	requireClient(t, "curl")
	secretFile := filepath.Join(t.TempDir(), "rotating-key")
	// The start checks that the file exists (a missing secret is reported by --check and at
	// start); that it can disappear and come back afterwards is what this test is about.
	writeAtomic(t, secretFile, newSecret("rotating secret at start")+"\n")
	api := newUpstream(t, true, nil)
	e := startEscrow(t, fmt.Sprintf(`
identity:
  static: %[1]s
policy:
  dir: %[2]s
upstreams:
  - host: api.example.test
    credential: rotating
    address: %[3]s
    ca_file: %[4]s
credentials:
  rotating: {static: {file: %[5]s}}
egress:
  allow_cidrs: [127.0.0.0/8]
`, staticID, testdata("policies", "static"), api.Addr, upstreamCA.certFile, secretFile), escrowOptions{})

	get := func(t *testing.T) (response, string) {
		t.Helper()
		path := uniquePath("/v1/models", "rotation")
		return doCurl(t, e, call{URL: "https://api.example.test" + path, Headers: agentHeaders}, false), path
	}

	t.Run("missing_secret_file_is_503_credential_unavailable_and_nothing_is_sent", func(t *testing.T) {
		if err := os.Remove(secretFile); err != nil {
			t.Fatal(err)
		}
		var r response
		var path string
		waitFor(t, 10*time.Second, "escrow to notice the secret file is gone", func() bool {
			r, path = get(t)
			return r.Status == http.StatusServiceUnavailable
		})
		d := checkDenial(t, r, http.StatusServiceUnavailable, "credential_unavailable")
		if rec := e.auditByID(t, d.RequestID); rec.Reason != "credential_unavailable" || rec.CredentialID != "" {
			t.Errorf("record %s, want credential_unavailable without a credential_id", rec.Raw)
		}
		if n := len(api.requests(path)); n != 0 {
			t.Errorf("the upstream was called %d time(s) without a credential", n)
		}
	})

	var firstID string
	t.Run("secret_file_that_appears_is_used_without_restart", func(t *testing.T) {
		a := newSecret("rotating secret A")
		api.setExpectation("api.example.test", bearer(a))
		writeAtomic(t, secretFile, a+"\n")
		var path string
		waitFor(t, 10*time.Second, "escrow to use the new secret file", func() bool {
			var r response
			r, path = get(t)
			return r.Status == http.StatusOK
		})
		checkUpstreamSawOnlyTheRealKey(t, api, path)
		firstID = e.auditFor(t, path).CredentialID
	})

	t.Run("rotated_secret_file_is_followed_without_restart", func(t *testing.T) {
		b := newSecret("rotating secret B")
		api.setExpectation("api.example.test", bearer(b))
		writeAtomic(t, secretFile, b+"\n")
		var path string
		waitFor(t, 10*time.Second, "escrow to use the rotated secret", func() bool {
			var r response
			r, path = get(t)
			return r.Status == http.StatusOK
		})
		checkUpstreamSawOnlyTheRealKey(t, api, path)
		if id := e.auditFor(t, path).CredentialID; id == "" || id == firstID {
			t.Errorf("credential_id %q after rotation, want a new instance id (was %q)", id, firstID)
		}
	})

	e.finish(t)
}
