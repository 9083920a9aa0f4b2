package harness

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// DexClient is an OAuth2 client registered in dex (client_secret_basic or _post).
type DexClient struct {
	ID     string
	Secret string
}

// DexOptions configure StartDex.
type DexOptions struct {
	// SPIFFEIssuer is SPIRE's OIDC issuer (SPIRE.IssuerURL). dex then has an OIDC connector,
	// ConnectorID "spiffe", trusting it: RFC 8693 token exchange of a JWT-SVID whose audience is
	// ConnectorClientID. Empty: dex's password DB is the only connector (no token exchange).
	SPIFFEIssuer string
	// ConnectorClientID is the audience the connector accepts in JWT-SVIDs; default "dex".
	ConnectorClientID string
	// Clients default to one: {ID: "escrow", Secret: a random value}.
	Clients []DexClient
	// TLS serves HTTPS with a certificate from a CA of its own (Dex.CAFile); default plain HTTP.
	TLS bool
	// ExtraYAML is appended to dex's config (top-level keys such as `expiry:`).
	ExtraYAML string
}

// Dex is a running dex (memory storage) on loopback.
type Dex struct {
	// Issuer is dex's issuer URL (http(s)://127.0.0.1:P/dex); TokenURL, JWKSURL and
	// DiscoveryURL are below it.
	Issuer       string
	TokenURL     string
	JWKSURL      string
	DiscoveryURL string
	// CAFile is the CA of dex's TLS certificate ("" without TLS).
	CAFile string
	// ConnectorID is the connector_id of token exchanges ("spiffe"), "" without SPIFFEIssuer.
	ConnectorID string
	Clients     []DexClient
	// ConfigFile is the config dex runs with.
	ConfigFile string

	proc *Process
}

// StartDex starts dex and waits for its discovery document.
func StartDex(t testing.TB, o DexOptions) *Dex {
	t.Helper()
	bin := Bin(t, "dex")
	dir := ShortTempDir(t)
	port := FreePort(t)
	if len(o.Clients) == 0 {
		o.Clients = []DexClient{{ID: "escrow", Secret: "dex-secret-" + randomHex(t, 12)}}
	}
	if o.ConnectorClientID == "" {
		o.ConnectorClientID = "dex"
	}
	d := &Dex{Clients: o.Clients, ConfigFile: filepath.Join(dir, "dex.yaml")}
	scheme, web := "http", fmt.Sprintf("  http: 127.0.0.1:%d\n", port)
	var roots *x509.CertPool
	if o.TLS {
		ca := NewCA(t)
		_, certFile, keyFile := ca.Leaf(t, "127.0.0.1", "localhost")
		d.CAFile = ca.CertFile
		roots = x509.NewCertPool()
		roots.AddCert(ca.Cert)
		scheme = "https"
		web = fmt.Sprintf("  https: 127.0.0.1:%d\n  tlsCert: %s\n  tlsKey: %s\n", port, certFile, keyFile)
	}
	d.Issuer = fmt.Sprintf("%s://127.0.0.1:%d/dex", scheme, port)
	d.TokenURL = d.Issuer + "/token"
	d.JWKSURL = d.Issuer + "/keys"
	d.DiscoveryURL = d.Issuer + "/.well-known/openid-configuration"

	var cfg strings.Builder
	fmt.Fprintf(&cfg, "issuer: %s\nstorage:\n  type: memory\nweb:\n%s", d.Issuer, web)
	cfg.WriteString(`oauth2:
  grantTypes: ["client_credentials", "urn:ietf:params:oauth:grant-type:token-exchange", "refresh_token"]
  skipApprovalScreen: true
staticClients:
`)
	for _, c := range o.Clients {
		fmt.Fprintf(&cfg, "- id: %q\n  name: %q\n  secret: %q\n  redirectURIs: [\"http://127.0.0.1/callback\"]\n", c.ID, c.ID, c.Secret)
	}
	if o.SPIFFEIssuer != "" {
		d.ConnectorID = "spiffe"
		// JWT-SVIDs have no email and no name: no email scope, and the user name is sub.
		fmt.Fprintf(&cfg, `connectors:
- type: oidc
  id: spiffe
  name: SPIFFE
  config:
    issuer: %s
    clientID: %s
    clientSecret: unused
    redirectURI: %s/callback
    scopes: ["openid"]
    insecureSkipEmailVerified: true
    userNameKey: sub
`, o.SPIFFEIssuer, o.ConnectorClientID, d.Issuer)
	} else {
		cfg.WriteString("enablePasswordDB: true\n")
	}
	cfg.WriteString(o.ExtraYAML)
	writeFile(t, d.ConfigFile, cfg.String())

	d.proc = StartProcess(t, ProcessOptions{Name: "dex", Path: bin, Args: []string{"serve", d.ConfigFile}})
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	Eventually(t, 60*time.Second, "dex discovery document", func() error {
		if d.proc.Exited() {
			t.Fatalf("harness: dex exited (%v):\n%s", d.proc.Err(), tailBytes(d.proc.Output(), 8<<10))
		}
		res, err := c.Get(d.DiscoveryURL)
		if err != nil {
			return err
		}
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			return fmt.Errorf("GET %s: %s", d.DiscoveryURL, res.Status)
		}
		return nil
	})
	return d
}

// Process is the dex child process.
func (d *Dex) Process() *Process { return d.proc }

// HTTPClient trusts dex's TLS certificate (plain client without TLS).
func (d *Dex) HTTPClient(t testing.TB) *http.Client {
	t.Helper()
	tr := &http.Transport{}
	if d.CAFile != "" {
		pem, err := os.ReadFile(d.CAFile)
		if err != nil {
			t.Fatal(err)
		}
		roots := x509.NewCertPool()
		roots.AppendCertsFromPEM(pem)
		tr.TLSClientConfig = &tls.Config{RootCAs: roots}
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: tr}
}
