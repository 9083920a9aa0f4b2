package proxy

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
)

// Revocation is one revocation in force: while it is, the identities it covers are denied
// (403 revoked) and the credentials it names are dropped and never minted. Its fields are the
// control plane's wire type's, in the same order, so a value of that type converts with
// proxy.Revocation(r).
type Revocation struct {
	// Name identifies the revocation ("<namespace>/<name>"); audit records name it.
	Name string
	// SPIFFEIDs are denied exactly.
	SPIFFEIDs []string
	// SPIFFEIDPrefixes deny every ID that starts with one of them at a path-segment boundary
	// ("spiffe://td/ns/a" covers "spiffe://td/ns/a/sa/b", not "spiffe://td/ns/ab").
	SPIFFEIDPrefixes []string
	// Credentials are dropped (and revoked at their issuer where the provider can) and not
	// minted again.
	Credentials []string
	// Reason is the operator's note; it is logged, never sent to the agent.
	Reason string
}

// revocations is a compiled, immutable set of revocations: part of the state a request loads
// once. The nil value revokes nothing and costs a nil check.
type revocations struct {
	list     []Revocation
	ids      map[string]string // exact SPIFFE ID → revocation name
	prefixes []revokedPrefix
	creds    map[string]string // credential name → revocation name
}

type revokedPrefix struct{ prefix, name string }

// compileRevocations checks list and indexes it; an empty list compiles to nil (none in force).
func compileRevocations(list []Revocation) (*revocations, error) {
	if len(list) == 0 {
		return nil, nil
	}
	r := &revocations{list: list, ids: map[string]string{}, creds: map[string]string{}}
	var errs []error
	for i, rv := range list {
		if rv.Name == "" {
			errs = append(errs, fmt.Errorf("revocations[%d].name: required", i))
		}
		if len(rv.SPIFFEIDs)+len(rv.SPIFFEIDPrefixes)+len(rv.Credentials) == 0 {
			errs = append(errs, fmt.Errorf("revocations[%d]: names no SPIFFE ID, prefix or credential", i))
		}
		for _, id := range rv.SPIFFEIDs {
			if !strings.HasPrefix(id, "spiffe://") {
				errs = append(errs, fmt.Errorf("revocations[%d].spiffe_ids: %q is not a SPIFFE ID", i, id))
			}
			if _, dup := r.ids[id]; !dup {
				r.ids[id] = rv.Name
			}
		}
		for _, p := range rv.SPIFFEIDPrefixes {
			p = strings.TrimSuffix(p, "/")
			// A prefix must name a trust domain at least: "spiffe://" alone would revoke all.
			if !strings.HasPrefix(p, "spiffe://") || len(p) <= len("spiffe://") {
				errs = append(errs, fmt.Errorf("revocations[%d].spiffe_id_prefixes: %q is not a spiffe:// prefix with a trust domain", i, p))
				continue
			}
			r.prefixes = append(r.prefixes, revokedPrefix{p, rv.Name})
		}
		for _, c := range rv.Credentials {
			if c == "" {
				errs = append(errs, fmt.Errorf("revocations[%d].credentials: an empty name", i))
			}
			if _, dup := r.creds[c]; !dup {
				r.creds[c] = rv.Name
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("proxy: revocations: %w", err)
	}
	return r, nil
}

// identity returns the name of the revocation covering the SPIFFE ID id, if any.
func (r *revocations) identity(id string) (string, bool) {
	if r == nil || id == "" {
		return "", false
	}
	if n, ok := r.ids[id]; ok {
		return n, true
	}
	for _, p := range r.prefixes {
		if id == p.prefix || strings.HasPrefix(id, p.prefix) && id[len(p.prefix)] == '/' {
			return p.name, true
		}
	}
	return "", false
}

// credential returns the name of the revocation naming the credential, if any.
func (r *revocations) credential(name string) (string, bool) {
	if r == nil || name == "" {
		return "", false
	}
	n, ok := r.creds[name]
	return n, ok
}

// covers reports the revocation that denies a request of identity id through credential cred
// (either may be empty), if any.
func (r *revocations) covers(id, cred string) (string, bool) {
	if n, ok := r.identity(id); ok {
		return n, true
	}
	return r.credential(cred)
}

// subjects remembers the SPIFFE IDs credentials were requested for, so that a revocation by
// prefix can drop their cached tokens: the credential cache forgets by exact subject. A sidecar
// serves one workload, so this holds one ID, rarely a few; it stops growing at maxSubjects.
type subjects struct {
	last atomic.Pointer[string] // the ID added last: the hot path checks it without a lock
	mu   sync.Mutex
	seen map[string]struct{}
}

const maxSubjects = 4096

func (s *subjects) add(id string) {
	if id == "" {
		return
	}
	if l := s.last.Load(); l != nil && *l == id {
		return
	}
	s.mu.Lock()
	if s.seen == nil {
		s.seen = map[string]struct{}{}
	}
	if len(s.seen) < maxSubjects {
		s.seen[id] = struct{}{}
	}
	s.mu.Unlock()
	s.last.Store(&id)
}

// covered returns the IDs seen that r's identity revocations cover, exact IDs included.
func (s *subjects) covered(r *revocations) []string {
	if r == nil {
		return nil
	}
	out := make([]string, 0, len(r.ids))
	for id := range r.ids {
		out = append(out, id)
	}
	if len(r.prefixes) == 0 {
		return out
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for id := range s.seen {
		if _, exact := r.ids[id]; exact {
			continue
		}
		for _, p := range r.prefixes {
			if id == p.prefix || strings.HasPrefix(id, p.prefix+"/") {
				out = append(out, id)
				break
			}
		}
	}
	return out
}
