package credential

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/config"
)

// fakeBroker answers Mint like escrow controller would, counting the calls.
type fakeBroker struct {
	mu    sync.Mutex
	calls []BrokerRequest
	exp   time.Time
	err   error
}

func (b *fakeBroker) Mint(_ context.Context, r BrokerRequest) (Token, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls = append(b.calls, r)
	if b.err != nil {
		return Token{}, b.err
	}
	return NewToken(r.Name, "ghs_brokered"+strings.Repeat("x", len(b.calls)), b.exp), nil
}

func (b *fakeBroker) n() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.calls)
}

func TestNewProvider_BrokerMintsOncePerExpiryWhoeverCalls(t *testing.T) {
	clock := newFakeClock()
	b := &fakeBroker{exp: clock.Now().Add(time.Hour)}
	p, err := NewProvider("github", config.Credential{Broker: &config.Broker{}}, Deps{Broker: b})
	if err != nil {
		t.Fatal(err)
	}
	if KindOf(p) != "broker" {
		t.Errorf("kind = %q", KindOf(p))
	}
	m := NewManager(map[string]Provider{"github": p}, Options{Now: clock.Now})
	a := get(t, m, Request{Name: "github", Subject: "spiffe://example.org/a"})
	c := get(t, m, Request{Name: "github", Subject: "spiffe://example.org/b"})
	if b.n() != 1 || a.ID() != c.ID() || a.Name() != "github" || !a.ExpiresAt().Equal(b.exp) {
		t.Fatalf("%d mints; tokens %v %v expiring %v", b.n(), a, c, a.ExpiresAt())
	}
	if b.calls[0] != (BrokerRequest{Name: "github"}) {
		t.Errorf("asked %+v", b.calls[0])
	}
	// The expiry the controller sent drives the refresh, as for any other token.
	b.mu.Lock()
	b.exp = clock.Now().Add(2 * time.Hour)
	b.mu.Unlock()
	clock.Advance(time.Hour + time.Second)
	if d := get(t, m, Request{Name: "github"}); b.n() != 2 || d.ID() == a.ID() {
		t.Fatalf("after expiry: %d mints, token %v", b.n(), d)
	}
}

func TestNewProvider_BrokerWithoutAConnectionIsAnError(t *testing.T) {
	_, err := NewProvider("github", config.Credential{Broker: &config.Broker{}}, Deps{})
	if err == nil || !strings.Contains(err.Error(), "credential: github: broker: no connection to escrow controller") {
		t.Fatalf("error %v", err)
	}
}

func TestBroker_RefusalsAndTokensWithoutExpiryAreUnavailable(t *testing.T) {
	for name, b := range map[string]*fakeBroker{
		"refused":   {err: errors.New("PermissionDenied")},
		"no expiry": {},
	} {
		t.Run(name, func(t *testing.T) {
			p, err := NewBrokered(Deps{Broker: b})
			if err != nil {
				t.Fatal(err)
			}
			m := NewManager(map[string]Provider{"github": p}, Options{})
			_, err = m.Get(context.Background(), Request{Name: "github"})
			if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "broker: ") {
				t.Fatalf("error %v; want ErrUnavailable from the broker", err)
			}
			if strings.Contains(err.Error(), "ghs_brokered") {
				t.Errorf("error quotes the token: %v", err)
			}
		})
	}
}

// The controller builds brokered providers from the config a sidecar would get, with the
// Secret paths served from memory: no file on disk holds the key.
func TestDeps_ReadFileServesTheSecretsOfGitHubAppAndOAuth2(t *testing.T) {
	disk := writeRSAKey(t)
	pemKey, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	g := &githubStandIn{t: t, pub: readRSAPublic(t, disk), tokens: map[string]bool{}}
	if err := os.Remove(disk); err != nil {
		t.Fatal(err)
	}
	srv, ca := tlsStandIn(t, g)
	const keyPath = "/var/run/escrow-secrets/github-app/private-key.pem"
	var read []string
	d := testDeps(nil)
	d.ReadFile = func(path string) ([]byte, error) {
		read = append(read, path)
		switch path {
		case keyPath:
			return pemKey, nil
		case ca:
			return os.ReadFile(ca)
		}
		return nil, os.ErrNotExist
	}
	p, err := NewProvider("github", config.Credential{GitHubApp: &config.GitHubApp{AppID: ghAppID, InstallationID: ghInstallation,
		PrivateKeyFile: keyPath, APIURL: srv.URL + "/api/v3", CAFile: ca}}, d)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "github"})
	if err != nil || !strings.HasPrefix(tok.Value(), "ghs_") {
		t.Fatalf("token %v, error %v", tok, err)
	}
	if strings.Join(read, ",") != ca+","+keyPath+","+keyPath {
		t.Errorf("read %q", read)
	}

	// oauth2's client secret too; a path ReadFile does not serve is an error naming it.
	d.ReadFile = func(path string) ([]byte, error) {
		if path == "/var/run/escrow-secrets/idp/secret" {
			return []byte(secretValue + "\n"), nil
		}
		return nil, &os.PathError{Op: "open", Path: path, Err: os.ErrNotExist}
	}
	for file, want := range map[string]string{"/var/run/escrow-secrets/idp/secret": "", filepath.Join(t.TempDir(), "nope"): "nope"} {
		o, err := NewProvider("idp", config.Credential{OAuth2: &config.OAuth2{TokenURL: "http://127.0.0.1:1/token", ClientID: "c",
			ClientSecretFile: file, AuthStyle: config.AuthStyleBasic}}, d)
		if err != nil {
			t.Fatal(err)
		}
		_, err = o.Fetch(context.Background(), FetchArgs{Name: "idp"})
		switch {
		case err == nil:
			t.Fatal("fetched from a closed port")
		case want == "" && strings.Contains(err.Error(), "secret file"):
			t.Errorf("the served secret was not read: %v", err)
		case want != "" && !strings.Contains(err.Error(), "secret file: open "+file):
			t.Errorf("error %v; want it to name %s", err, file)
		}
		assertNoSecrets(t, "error", err.Error(), secretValue)
	}
}
