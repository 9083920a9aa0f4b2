package credential

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"golang.org/x/oauth2"
)

// DefaultTokenLifetime is how long a token whose issuer states no lifetime (no expires_in) is
// cached: short, so a token the issuer revokes is not served for long.
const DefaultTokenLifetime = 5 * time.Minute

// maxResponse bounds what is read of a token endpoint's answer.
const maxResponse = 1 << 20

// endpointClient returns the HTTP client a provider uses for its endpoint: d.HTTPClient (which
// dials through the egress rules), with the PEM certificates of caFile added to the system
// roots when caFile is set. It refuses to work without d.HTTPClient: providers never fall back
// to a client of their own.
func endpointClient(d Deps, caFile string) (*http.Client, error) {
	if d.HTTPClient == nil {
		return nil, errors.New("no HTTP client (the egress-checked client is required)")
	}
	if caFile == "" {
		return d.HTTPClient, nil
	}
	pem, err := readFile(d, caFile)
	if err != nil {
		return nil, fmt.Errorf("ca_file: %w", err)
	}
	roots, err := x509.SystemCertPool()
	if err != nil || roots == nil {
		roots = x509.NewCertPool()
	}
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("ca_file %s: no PEM certificate in it", caFile)
	}
	base := d.HTTPClient.Transport
	if base == nil {
		return nil, errors.New("ca_file: the HTTP client has no transport to add the CA to")
	}
	t, ok := base.(*http.Transport)
	if !ok {
		return nil, fmt.Errorf("ca_file: the HTTP client's transport is a %T, not an *http.Transport", base)
	}
	t = t.Clone() // same dialer: still egress-checked
	if t.TLSClientConfig == nil {
		t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	t.TLSClientConfig.RootCAs = roots
	c := *d.HTTPClient
	c.Transport = t
	return &c, nil
}

// readFile reads a file a provider's configuration names through d.ReadFile, or the file
// system.
func readFile(d Deps, path string) ([]byte, error) {
	if d.ReadFile != nil {
		return d.ReadFile(path)
	}
	return os.ReadFile(path)
}

// withClient puts c where golang.org/x/oauth2 looks for the HTTP client to use.
func withClient(ctx context.Context, c *http.Client) context.Context {
	return context.WithValue(ctx, oauth2.HTTPClient, c)
}

// svidAlgs are the algorithms a JWT-SVID may be signed with (the SPIFFE JWT-SVID spec).
var svidAlgs = []jose.SignatureAlgorithm{
	jose.RS256, jose.RS384, jose.RS512, jose.ES256, jose.ES384, jose.ES512, jose.PS256, jose.PS384, jose.PS512,
}

// jwtSVID returns a JWT-SVID of the pod's workload for audience. When subject is set it must be
// the SVID's subject: a token is minted only for the identity it is cached under.
func jwtSVID(ctx context.Context, d Deps, audience, subject string) (string, error) {
	if d.JWT == nil {
		return "", errors.New("no JWT-SVID source: the identity is not SPIFFE")
	}
	tok, _, err := d.JWT.JWTSVID(ctx, audience)
	if err != nil {
		return "", fmt.Errorf("JWT-SVID for audience %q: %w", audience, err)
	}
	if subject != "" {
		// The source is the workload's own agent, trusted as such; this check only keeps a
		// misrouted request from minting under another identity's cache key.
		parsed, err := jwt.ParseSigned(tok, svidAlgs)
		if err != nil {
			return "", fmt.Errorf("JWT-SVID for audience %q: %w", audience, err)
		}
		var c jwt.Claims
		if err := parsed.UnsafeClaimsWithoutVerification(&c); err != nil {
			return "", fmt.Errorf("JWT-SVID for audience %q: %w", audience, err)
		}
		if c.Subject != subject {
			return "", fmt.Errorf("JWT-SVID for audience %q is for %q, not the caller %q", audience, c.Subject, subject)
		}
	}
	return tok, nil
}

// readSecretFile reads a secret (client secret, private key, service account token) from path,
// trimmed; an empty or oversized file is an error naming the path, never quoting its content.
func readSecretFile(d Deps, path string) (string, error) {
	var b []byte
	if d.ReadFile != nil {
		var err error
		if b, err = d.ReadFile(path); err != nil {
			return "", fmt.Errorf("secret file: %w", err)
		}
	} else {
		f, err := os.Open(path)
		if err != nil {
			return "", fmt.Errorf("secret file: %w", err)
		}
		defer f.Close()
		if b, err = io.ReadAll(io.LimitReader(f, maxFileSize+1)); err != nil {
			return "", fmt.Errorf("secret file %s: %w", path, err)
		}
	}
	if len(b) > maxFileSize {
		return "", fmt.Errorf("secret file %s is larger than %d bytes", path, maxFileSize)
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return "", fmt.Errorf("secret file %s is empty", path)
	}
	return v, nil
}

// scrub removes every secret from s (an error text from a server, which may echo what it was
// sent) and bounds its length.
func scrub(s string, secrets ...string) string {
	for _, v := range secrets {
		if len(v) >= 4 {
			s = strings.ReplaceAll(s, v, "[redacted]")
		}
	}
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// oauthError turns an error of golang.org/x/oauth2 into one that names the endpoint's answer
// (status, RFC 6749 §5.2 error code and description) and nothing the request carried: the
// library's own text includes the raw response body.
func oauthError(err error, secrets ...string) error {
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		return errors.New(scrub(err.Error(), secrets...))
	}
	status := 0
	if re.Response != nil {
		status = re.Response.StatusCode
	}
	msg := fmt.Sprintf("token endpoint answered %d", status)
	if re.ErrorCode != "" {
		msg += ": " + scrub(re.ErrorCode, secrets...)
		if re.ErrorDescription != "" {
			msg += ": " + scrub(re.ErrorDescription, secrets...)
		}
	}
	return &EndpointError{Status: status, Code: re.ErrorCode, msg: msg}
}

// EndpointError is a token endpoint's refusal: its HTTP status and, for OAuth2 endpoints, the
// RFC 6749 §5.2 error code ("invalid_client", "invalid_grant", ...). Its text never holds a
// secret.
type EndpointError struct {
	Status int
	Code   string
	msg    string
}

func (e *EndpointError) Error() string { return e.msg }

// expiryOr returns exp, or now + DefaultTokenLifetime when exp is zero.
func expiryOr(exp, now time.Time) time.Time {
	if exp.IsZero() {
		return now.Add(DefaultTokenLifetime)
	}
	return exp
}

func nowFunc(d Deps) func() time.Time {
	if d.Now != nil {
		return d.Now
	}
	return time.Now
}
