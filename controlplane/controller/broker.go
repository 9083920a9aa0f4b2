package controller

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
	"github.com/escrowproxy/escrow/controlplane/broker"
	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/credential"
)

// secretReadTimeout bounds one read of a Secret from the API server.
const secretReadTimeout = 10 * time.Second

// SecretsResource is the core API's Secrets (the controller may get them in its own
// namespace only).
var SecretsResource = schema.GroupVersionResource{Version: "v1", Resource: "secrets"}

// BrokerOptions configure a Broker.
type BrokerOptions struct {
	// Client reads the Secrets the brokered Credentials reference, in Namespace (escrow's own).
	Client    dynamic.Interface
	Namespace string
	// HTTPClient calls the providers' endpoints (default: system roots, the environment's
	// proxy settings).
	HTTPClient *http.Client
	// ReadFile reads other files a provider names (a ca_file, in the controller's container);
	// default os.ReadFile.
	ReadFile func(string) ([]byte, error)
	Logger   *zap.Logger
	Now      func() time.Time
}

// Broker mints the tokens of brokered Credentials for sidecars (broker.Minter): it holds the
// root secrets, which it reads from the API server when a provider needs them and never writes
// anywhere. Tokens come from one credential.Manager, keyed by the credential alone: however
// many sidecars ask, a credential costs one upstream mint per token lifetime. It is a
// Publisher: each View changes the credentials it serves and the revocations it applies.
type Broker struct {
	o   BrokerOptions
	mgr *credential.Manager
	log *zap.Logger

	state atomic.Pointer[brokerState]

	mu    sync.Mutex // serialises Update
	built map[string]*lazyProvider
}

type brokerState struct {
	creds map[string]Brokered
	// revocations are those of escrow's namespace (cluster) and of each other namespace.
	cluster []bundle.Revocation
	byNS    map[string][]bundle.Revocation
}

// NewBroker returns a Broker serving nothing until its first Update.
func NewBroker(o BrokerOptions) (*Broker, error) {
	if o.Client == nil || o.Namespace == "" {
		return nil, errors.New("controller: the broker needs a client and escrow's namespace")
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.ReadFile == nil {
		o.ReadFile = os.ReadFile
	}
	if o.HTTPClient == nil {
		o.HTTPClient = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
			Proxy: http.ProxyFromEnvironment, ForceAttemptHTTP2: true,
			TLSHandshakeTimeout: 10 * time.Second, IdleConnTimeout: 90 * time.Second,
		}}
	}
	b := &Broker{o: o, log: o.Logger, built: map[string]*lazyProvider{}}
	// Never closed: Close would revoke the tokens sidecars still hold, and a controller stops
	// at every rollout.
	b.mgr = credential.NewManager(nil, credential.Options{Now: o.Now, Logger: o.Logger.Named("credential")})
	return b, nil
}

// Update applies a View: its brokered Credentials (a changed one is rebuilt, and the tokens
// minted under the old one are dropped and revoked where the provider can), and its
// Revocations (a cluster-wide one naming a credential drops its tokens the same way; every
// one refuses the mints it covers while it exists).
func (b *Broker) Update(v *View) {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := &brokerState{creds: v.Brokered(), cluster: v.Revocations(v.clusterNS), byNS: map[string][]bundle.Revocation{}}
	for ns := range v.byNS {
		if ns != v.clusterNS {
			st.byNS[ns] = v.Revocations(ns)
		}
	}
	// Refuse first, then drop: no mint slips between the two.
	b.state.Store(st)
	dropped := map[string]bool{}
	for _, r := range st.cluster {
		for _, n := range r.Credentials {
			dropped[n] = true
		}
	}
	providers := map[string]credential.Provider{}
	built := map[string]*lazyProvider{}
	for name, c := range st.creds {
		if dropped[name] {
			continue
		}
		p := b.built[name]
		if p == nil || !reflect.DeepEqual(p.cfg, c.Config) {
			p = &lazyProvider{name: name, cfg: c.Config, deps: b.deps()}
		}
		providers[name], built[name] = p, p
	}
	b.built = built
	b.mgr.Update(providers)
}

func (b *Broker) deps() credential.Deps {
	return credential.Deps{HTTPClient: b.o.HTTPClient, ReadFile: b.readFile, Now: b.o.Now,
		Logger: b.log.Named("credential"), LookupEnv: func(string) (string, bool) { return "", false }}
}

// Mint implements broker.Minter.
func (b *Broker) Mint(ctx context.Context, r broker.Request) (credential.Token, error) {
	st := b.state.Load()
	if st == nil {
		// Not found rather than unavailable: the name is the caller's, and only a brokered
		// Credential's name may become a metric label.
		return credential.Token{}, broker.Refuse(broker.ResultNotFound, errors.New("no resources read yet"))
	}
	c, ok := st.creds[r.Credential]
	if !ok {
		return credential.Token{}, broker.Refuse(broker.ResultNotFound, nil)
	}
	caller := r.Caller.String()
	if !c.Allows(caller) {
		return credential.Token{}, broker.Refuse(broker.ResultDenied,
			fmt.Errorf("%s is not in the Credential's broker.spiffe_ids or broker.spiffe_id_prefixes", caller))
	}
	if rev := st.revoking(caller, r.Credential); rev != "" {
		return credential.Token{}, broker.Refuse(broker.ResultRevoked, fmt.Errorf("Revocation %s", rev))
	}
	if r.Scope != "" {
		return credential.Token{}, broker.Refuse(broker.ResultInvalid, errors.New("brokered credentials take no scope"))
	}
	tok, err := b.mgr.Get(ctx, credential.Request{Name: r.Credential})
	if err != nil {
		return credential.Token{}, broker.Refuse(broker.ResultUnavailable, err)
	}
	return tok, nil
}

// revoking names the Revocation that refuses caller the credential: one of escrow's namespace
// or of the caller's (the ones its sidecar applies) that covers the caller or names the
// credential; "" if none.
func (st *brokerState) revoking(caller, cred string) string {
	revs := st.cluster
	if ns, ok := Namespace(caller); ok {
		revs = append(slices.Clip(revs), st.byNS[ns]...)
	}
	for _, r := range revs {
		if r.Covers(caller) || slices.Contains(r.Credentials, cred) {
			return r.Name
		}
	}
	return ""
}

// readFile serves SecretsDir/S/K from key K of Secret S in escrow's namespace, read from the
// API server now (so a rotated Secret is used from the next mint on), and any other path (a
// ca_file) from the controller's own file system.
func (b *Broker) readFile(path string) ([]byte, error) {
	rest, ok := strings.CutPrefix(path, v1alpha1.SecretsDir+"/")
	if !ok {
		return b.o.ReadFile(path)
	}
	name, key, ok := strings.Cut(rest, "/")
	ref := v1alpha1.SecretKeyRef{Name: name, Key: key}
	if !ok {
		return nil, fmt.Errorf("%s names no Secret key", path)
	}
	if err := ref.Check(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), secretReadTimeout)
	defer cancel()
	u, err := b.o.Client.Resource(SecretsResource).Namespace(b.o.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("Secret %s/%s: %w", b.o.Namespace, name, err)
	}
	data, _, _ := unstructured.NestedStringMap(u.Object, "data")
	v, ok := data[key]
	if !ok {
		return nil, fmt.Errorf("Secret %s/%s has no key %q", b.o.Namespace, name, key)
	}
	raw, err := base64.StdEncoding.DecodeString(v)
	if err != nil {
		return nil, fmt.Errorf("Secret %s/%s key %q is not base64", b.o.Namespace, name, key)
	}
	return raw, nil
}

// lazyProvider builds its provider at the first fetch, and again after a failed build: the
// build reads the Secret (a GitHub App key is checked then), which may not exist yet, and a
// failed build fails the fetch, so the Manager's failure backoff paces the retries.
type lazyProvider struct {
	name string
	cfg  config.Credential
	deps credential.Deps

	mu sync.Mutex
	p  credential.Provider
}

func (l *lazyProvider) provider() (credential.Provider, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.p == nil {
		p, err := credential.NewProvider(l.name, l.cfg, l.deps)
		if err != nil {
			return nil, err
		}
		l.p = p
	}
	return l.p, nil
}

func (l *lazyProvider) Fetch(ctx context.Context, args credential.FetchArgs) (credential.Token, error) {
	p, err := l.provider()
	if err != nil {
		return credential.Token{}, err
	}
	return p.Fetch(ctx, args)
}

// Revoke revokes tok where the provider can (GitHub installation tokens; OAuth tokens
// when the Credential has a revocation_url).
func (l *lazyProvider) Revoke(ctx context.Context, tok credential.Token) error {
	l.mu.Lock()
	p := l.p
	l.mu.Unlock()
	if r, ok := p.(credential.Revoker); ok {
		return r.Revoke(ctx, tok)
	}
	return nil
}

// Kind is the provider's ("github_app", "oauth2").
func (l *lazyProvider) Kind() string { return l.cfg.Provider() }
