package policy

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	cedar "github.com/cedar-policy/cedar-go"

	"github.com/escrowproxy/escrow/attest"
)

// Entity type names of the Cedar model (see the package documentation).
const (
	TypeWorkload       = "Workload"
	TypeServiceAccount = "ServiceAccount"
	TypeNamespace      = "Namespace"
	TypeHost           = "Host"
	TypeAction         = "Action"
	// MCP entities (see Input.Resource); each one's parent is the Host.
	TypeTool     = "Tool"
	TypeResource = "Resource"
	TypePrompt   = "Prompt"
)

// Action names that are not HTTP methods.
const (
	// ActionConnect is Input.Action for a blind CONNECT tunnel.
	ActionConnect = "connect"
	// ActionRead is the group of the read-only methods GET, HEAD and OPTIONS.
	ActionRead = "read"
	// ActionWrite is the group of every other method.
	ActionWrite = "write"
	// MCP actions: the second decision on an MCP upstream, per JSON-RPC call.
	ActionToolsCall     = "tools/call"
	ActionResourcesRead = "resources/read"
	ActionPromptsGet    = "prompts/get"
)

// readMethods are the methods in Action::"read"; every other method is in Action::"write".
var readMethods = []string{"GET", "HEAD", "OPTIONS"}

// knownWriteMethods get pre-built action entities; other methods are built per request.
var knownWriteMethods = []string{"POST", "PUT", "PATCH", "DELETE", "CONNECT", "TRACE"}

// actionInfo is a pre-built action entity plus what the index needs to know about it.
type actionInfo struct {
	entity cedar.Entity
	// keys is the action and its ancestors (the group), for the index.
	keys []cedar.EntityUID
	// method is context.method.
	method string
	// resourceType is the entity type of the action's resource: "" for Host (HTTP actions),
	// TypeTool, TypeResource or TypePrompt for the MCP actions.
	resourceType string
}

var (
	uidRead  = cedar.NewEntityUID(TypeAction, ActionRead)
	uidWrite = cedar.NewEntityUID(TypeAction, ActionWrite)

	// actions holds the pre-built action entities by name (method or "connect").
	actions = buildActions()
	// actionEntities holds every pre-built action entity (groups included) by UID, for the
	// entity getter.
	actionEntities = func() map[cedar.EntityUID]cedar.Entity {
		m := map[cedar.EntityUID]cedar.Entity{
			uidRead:  {UID: uidRead},
			uidWrite: {UID: uidWrite},
		}
		for _, a := range actions {
			m[a.entity.UID] = a.entity
		}
		return m
	}()
)

func buildActions() map[string]*actionInfo {
	m := make(map[string]*actionInfo)
	for _, meth := range readMethods {
		m[meth] = newMethodAction(meth, uidRead)
	}
	for _, meth := range knownWriteMethods {
		m[meth] = newMethodAction(meth, uidWrite)
	}
	m[ActionConnect] = newStandaloneAction(ActionConnect, "CONNECT", "")
	// An MCP call travels in a POST; its action is in neither group (a read-only tool is
	// not a read-only HTTP request).
	m[ActionToolsCall] = newStandaloneAction(ActionToolsCall, "POST", TypeTool)
	m[ActionResourcesRead] = newStandaloneAction(ActionResourcesRead, "POST", TypeResource)
	m[ActionPromptsGet] = newStandaloneAction(ActionPromptsGet, "POST", TypePrompt)
	return m
}

func newStandaloneAction(name, method, resourceType string) *actionInfo {
	uid := cedar.NewEntityUID(TypeAction, cedar.String(name))
	return &actionInfo{
		entity:       cedar.Entity{UID: uid},
		keys:         []cedar.EntityUID{uid},
		method:       method,
		resourceType: resourceType,
	}
}

func newMethodAction(method string, group cedar.EntityUID) *actionInfo {
	uid := cedar.NewEntityUID(TypeAction, cedar.String(method))
	return &actionInfo{
		entity: cedar.Entity{UID: uid, Parents: cedar.NewEntityUIDSet(group)},
		keys:   []cedar.EntityUID{uid, group},
		method: method,
	}
}

// lookupAction returns the action for Input.Action: "connect" is the blind tunnel,
// "tools/call", "resources/read" and "prompts/get" are MCP calls, anything else is an HTTP
// method (upper-cased; unknown methods are writes).
func lookupAction(name string) *actionInfo {
	if a, ok := actions[name]; ok {
		return a
	}
	method := strings.ToUpper(name)
	if a, ok := actions[method]; ok {
		return a
	}
	return newMethodAction(method, uidWrite)
}

// principalInfo is the cached principal entity chain of one identity.
type principalInfo struct {
	uid cedar.EntityUID
	// entities is the workload followed by its ancestors (ServiceAccount, Namespace) when the
	// SPIFFE ID is Kubernetes-shaped.
	entities []cedar.Entity
	// keys holds the UIDs of entities (the principal and all its ancestors), for the index.
	keys []cedar.EntityUID
	// source and attested are the identity's, for context.attestation.
	source   string
	attested bool
	// att caches the last context.attestation record built for this identity: it only
	// changes when expires_in_s does, i.e. at most once a second.
	att atomic.Pointer[attestationCache]
}

type attestationCache struct {
	expiresIn int64
	rec       cedar.Record
}

func newPrincipal(id attest.Identity) *principalInfo {
	uid := cedar.NewEntityUID(TypeWorkload, cedar.String(id.SPIFFEID))
	td := id.TrustDomain
	if td == "" {
		td = trustDomainOf(id.SPIFFEID)
	}
	w := cedar.Entity{
		UID: uid,
		Attributes: cedar.NewRecord(cedar.RecordMap{
			"trust_domain": cedar.String(td),
			"attested":     cedar.Boolean(id.Attested),
		}),
	}
	p := &principalInfo{uid: uid, source: id.Source, attested: id.Attested}
	if ns, sa, ok := k8sShape(id.SPIFFEID); ok {
		saUID := cedar.NewEntityUID(TypeServiceAccount, cedar.String(ns+"/"+sa))
		nsUID := cedar.NewEntityUID(TypeNamespace, cedar.String(ns))
		w.Parents = cedar.NewEntityUIDSet(saUID)
		p.entities = []cedar.Entity{w, {UID: saUID, Parents: cedar.NewEntityUIDSet(nsUID)}, {UID: nsUID}}
		p.keys = []cedar.EntityUID{uid, saUID, nsUID}
		return p
	}
	p.entities = []cedar.Entity{w}
	p.keys = []cedar.EntityUID{uid}
	return p
}

// splitSPIFFE returns the trust domain and path of spiffe://td/path.
func splitSPIFFE(id string) (td, path string, ok bool) {
	rest, ok := strings.CutPrefix(id, "spiffe://")
	if !ok {
		return "", "", false
	}
	if i := strings.IndexByte(rest, '/'); i >= 0 {
		return rest[:i], rest[i:], true
	}
	return rest, "", true
}

func trustDomainOf(id string) string {
	td, _, _ := splitSPIFFE(id)
	return td
}

// k8sShape reports whether the SPIFFE ID's path is exactly /ns/<ns>/sa/<sa>.
func k8sShape(id string) (ns, sa string, ok bool) {
	_, path, ok := splitSPIFFE(id)
	if !ok {
		return "", "", false
	}
	rest, ok := strings.CutPrefix(path, "/ns/")
	if !ok {
		return "", "", false
	}
	ns, rest, ok = strings.Cut(rest, "/")
	if !ok || ns == "" {
		return "", "", false
	}
	sa, ok = strings.CutPrefix(rest, "sa/")
	if !ok || sa == "" || strings.Contains(sa, "/") {
		return "", "", false
	}
	return ns, sa, true
}

type principalKey struct {
	id, td, source string
	attested       bool
}

// maxCachedPrincipals bounds the principal cache. A pod has one or a handful of identities;
// past the bound, principals are built per request instead of cached.
const maxCachedPrincipals = 256

// principalCache is a copy-on-write map: reads are a lock-free atomic load and a map lookup
// without allocation; writes (a new identity) copy the map under a mutex.
type principalCache struct {
	m  atomic.Pointer[map[principalKey]*principalInfo]
	mu sync.Mutex
}

func (c *principalCache) get(id attest.Identity) *principalInfo {
	k := principalKey{id: id.SPIFFEID, td: id.TrustDomain, source: id.Source, attested: id.Attested}
	if m := c.m.Load(); m != nil {
		if p, ok := (*m)[k]; ok {
			return p
		}
	}
	p := newPrincipal(id)
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.m.Load()
	if old != nil {
		if q, ok := (*old)[k]; ok {
			return q
		}
		if len(*old) >= maxCachedPrincipals {
			return p
		}
	}
	m := make(map[principalKey]*principalInfo, 1+lenOf(old))
	if old != nil {
		for kk, v := range *old {
			m[kk] = v
		}
	}
	m[k] = p
	c.m.Store(&m)
	return p
}

func lenOf(m *map[principalKey]*principalInfo) int {
	if m == nil {
		return 0
	}
	return len(*m)
}

// request is one Cedar request with the entities it needs and the keys for the index.
type request struct {
	req       cedar.Request
	principal *principalInfo
	action    *actionInfo
	host      cedar.Entity
	hostKeys  [1]cedar.EntityUID
	// mcp is the resource of an MCP call; nil for an HTTP request, whose resource is the
	// host. Kept apart so that a plain request is no bigger than it was before MCP.
	mcp *mcpEntity
}

// mcpEntity is the resource of an MCP call: a Tool, Resource or Prompt whose parent is the
// request's host.
type mcpEntity struct {
	entity cedar.Entity
	keys   [2]cedar.EntityUID // the entity and its host, for the index
}

// resourceKeys returns the resource and its ancestors (resource first).
func (r *request) resourceKeys() []cedar.EntityUID {
	if r.mcp != nil {
		return r.mcp.keys[:]
	}
	return r.hostKeys[:]
}

// Get implements cedar's EntityGetter over the request's few entities, so no entity map is
// built per request.
func (r *request) Get(uid cedar.EntityUID) (cedar.Entity, bool) {
	for i := range r.principal.entities {
		if r.principal.entities[i].UID == uid {
			return r.principal.entities[i], true
		}
	}
	if uid == r.host.UID {
		return r.host, true
	}
	if r.mcp != nil && uid == r.mcp.entity.UID {
		return r.mcp.entity, true
	}
	if uid == r.action.entity.UID {
		return r.action.entity, true
	}
	if e, ok := actionEntities[uid]; ok {
		return e, true
	}
	return cedar.Entity{}, false
}

var (
	errNoPrincipal = errors.New("policy: input has no SPIFFE ID")
	errNoAction    = errors.New("policy: input has no action")
	errNoHost      = errors.New("policy: input has no host")
)

// normalizeHost lower-cases the host and removes one trailing dot, so that "API.github.com."
// cannot slip past a policy written for Host::"api.github.com".
func normalizeHost(h string) string {
	h = strings.ToLower(h)
	if len(h) > 1 {
		h = strings.TrimSuffix(h, ".")
	}
	return h
}

// buildRequest turns an Input into a Cedar request. now is used when in.Time is zero.
func buildRequest(pc *principalCache, in Input, now func() time.Time) (*request, error) {
	if in.Identity.SPIFFEID == "" {
		return nil, errNoPrincipal
	}
	if in.Action == "" {
		return nil, errNoAction
	}
	host := normalizeHost(in.Host)
	if host == "" {
		return nil, errNoHost
	}
	t := in.Time
	if t.IsZero() {
		t = now()
	}
	r := &request{
		principal: pc.get(in.Identity),
		action:    lookupAction(in.Action),
	}
	hostUID := cedar.NewEntityUID(TypeHost, cedar.String(host))
	r.host = cedar.Entity{UID: hostUID}
	r.hostKeys[0] = hostUID
	resource := hostUID
	if r.action.resourceType != "" || in.Resource != (Resource{}) {
		uid, err := mcpResource(in, r.action, host)
		if err != nil {
			return nil, err
		}
		r.mcp = &mcpEntity{
			entity: cedar.Entity{UID: uid, Parents: cedar.NewEntityUIDSet(hostUID)},
			keys:   [2]cedar.EntityUID{uid, hostUID},
		}
		resource = uid
	}
	ctx, err := buildContext(in, r.principal, r.action, t)
	if err != nil {
		return nil, err
	}
	r.req = cedar.Request{
		Principal: r.principal.uid,
		Action:    r.action.entity.UID,
		Resource:  resource,
		Context:   ctx,
	}
	return r, nil
}

// mcpResource checks that an MCP action comes with its resource and call, and returns the
// resource's UID: <Type>::"<host>/<name>", with the host part normalised like the host.
func mcpResource(in Input, a *actionInfo, host string) (cedar.EntityUID, error) {
	switch {
	case a.resourceType == "":
		return cedar.EntityUID{}, fmt.Errorf("policy: input has resource %s::%q, but action %q applies to hosts", in.Resource.Type, in.Resource.ID, in.Action)
	case in.Resource.Type != a.resourceType:
		return cedar.EntityUID{}, fmt.Errorf("policy: action %q needs a %s resource, input has %q", in.Action, a.resourceType, in.Resource.Type)
	case in.MCP == nil:
		return cedar.EntityUID{}, fmt.Errorf("policy: action %q needs the MCP call (Input.MCP)", in.Action)
	case in.MCP.Method != "" && in.MCP.Method != in.Action:
		return cedar.EntityUID{}, fmt.Errorf("policy: action %q with MCP method %q", in.Action, in.MCP.Method)
	}
	h, name, ok := strings.Cut(in.Resource.ID, "/")
	if !ok || normalizeHost(h) != host {
		return cedar.EntityUID{}, fmt.Errorf("policy: resource %s::%q is not under host %q", in.Resource.Type, in.Resource.ID, host)
	}
	return cedar.NewEntityUID(cedar.EntityType(a.resourceType), cedar.String(host+"/"+name)), nil
}

// buildContext builds the Cedar context record. To add a field, add it here and in
// schema.cedarschema (TestDefaultSchema_MatchesBuiltRequests checks they agree). The optional
// fields are present only when the input has them, so `context has caller` means "known".
func buildContext(in Input, p *principalInfo, a *actionInfo, t time.Time) (cedar.Record, error) {
	m := cedar.RecordMap{
		"scheme":      cedar.String(in.Scheme),
		"port":        cedar.Long(in.Port),
		"method":      cedar.String(a.method),
		"path":        cedar.String(in.Path),
		"credential":  cedar.String(in.Credential),
		"time":        cedar.NewDatetime(t),
		"attestation": p.attestation(in.Identity, t),
	}
	if in.Upgrade != "" {
		m["upgrade"] = cedar.String(strings.ToLower(in.Upgrade))
	}
	if c := in.Caller; c != nil {
		m["caller"] = cedar.NewRecord(cedar.RecordMap{
			"uid":    cedar.Long(c.UID),
			"gid":    cedar.Long(c.GID),
			"pid":    cedar.Long(c.PID),
			"exe":    cedar.String(c.Exe),
			"sha256": cedar.String(c.SHA256),
		})
	}
	if d := in.Delegation; d != nil {
		actors := make([]cedar.Value, len(d.Actors))
		nearest := ""
		for i, a := range d.Actors {
			actors[i] = cedar.String(a)
		}
		if len(d.Actors) > 0 {
			nearest = d.Actors[0]
		}
		m["delegation"] = cedar.NewRecord(cedar.RecordMap{
			"subject": cedar.String(d.Subject),
			"actors":  cedar.NewSet(actors...),
			"nearest": cedar.String(nearest),
			"depth":   cedar.Long(len(d.Actors)),
			"issuer":  cedar.String(d.Issuer),
		})
	}
	if c := in.MCP; c != nil {
		args, err := argumentsRecord(c.Arguments)
		if err != nil {
			return cedar.Record{}, err
		}
		method := c.Method
		if method == "" {
			method = in.Action
		}
		m["mcp"] = cedar.NewRecord(cedar.RecordMap{
			"method":    cedar.String(method),
			"name":      cedar.String(c.Name),
			"arguments": args,
		})
	}
	return cedar.NewRecord(m), nil
}

// attestation returns context.attestation for identity id (whose SPIFFE ID, trust domain,
// source and attested flag are p's) at time t.
func (p *principalInfo) attestation(id attest.Identity, t time.Time) cedar.Record {
	var expiresIn int64
	if id.Source != attest.SourceStatic && !id.ExpiresAt.IsZero() {
		expiresIn = int64(id.ExpiresAt.Sub(t) / time.Second)
	}
	if c := p.att.Load(); c != nil && c.expiresIn == expiresIn {
		return c.rec
	}
	rec := cedar.NewRecord(cedar.RecordMap{
		"source":       cedar.String(p.source),
		"attested":     cedar.Boolean(p.attested),
		"expires_in_s": cedar.Long(expiresIn),
	})
	p.att.Store(&attestationCache{expiresIn: expiresIn, rec: rec})
	return rec
}
