package controller

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/api/v1alpha1"
	"github.com/escrowproxy/escrow/controlplane/bundle"
)

// origins says which object each of a bundle's upstreams (by index) and credentials (by
// name) comes from.
type origins struct {
	upstreams   []ObjectRef
	credentials map[string]ObjectRef
}

// drop is an upstream or credential that validateBundle left out of one bundle.
type drop struct {
	ref    ObjectRef
	reason string // v1alpha1.ReasonInvalid or ReasonMissingCredential
	msg    string // about the object, key paths below spec: "spec.inject.header: ..."
	log    string // about the bundle: "upstream a.example port 0: upstreams[2].inject.header: ..."
}

func logLines(ds []drop) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.log
	}
	return out
}

// validateBundle drops from b the upstreams and credentials that the sidecar's config
// validation would refuse, and says why. A sidecar refuses a bundle whole (NACK) and keeps its
// last good one, so one tenant's mistake would otherwise hold back every later change for the
// namespace, a Revocation included. The checks are config.Validate's, on the bundle alone: an
// Upstream must name a Credential that is served with it (one in the sidecar's own file does
// not count, since the controller cannot see it). Dropping a credential can break an upstream
// that names it, so this repeats until nothing more is dropped. where names the namespaces
// whose Credentials the bundle holds (for the messages).
func validateBundle(b bundle.Bundle, origin origins, where string) (bundle.Bundle, []drop) {
	var out []drop
	defined := maps.Clone(origin.credentials) // before anything is dropped
	ups := slices.Clone(origin.upstreams)
	for range len(b.Upstreams) + len(b.Credentials) + 1 {
		errs := configErrors(b)
		if len(errs) == 0 {
			break
		}
		// One drop per object and round, its problems joined; MissingCredential only when
		// that is its only problem.
		byRef := map[ObjectRef]*drop{}
		var order []ObjectRef
		dropUp := map[int]bool{}
		dropCred := map[string]bool{}
		add := func(ref ObjectRef, reason, msg, log string) {
			d := byRef[ref]
			if d == nil {
				d = &drop{ref: ref, reason: reason}
				byRef[ref] = d
				order = append(order, ref)
			} else {
				d.msg += "; "
				d.log += "; "
				if d.reason != reason {
					d.reason = v1alpha1.ReasonInvalid
				}
			}
			d.msg += msg
			d.log += log
		}
		for _, e := range errs {
			if m := upstreamPath.FindStringSubmatch(e.Path); m != nil {
				i, _ := strconv.Atoi(m[1])
				if i >= len(b.Upstreams) {
					continue
				}
				dropUp[i] = true
				u := b.Upstreams[i]
				rest := strings.TrimPrefix(e.Path, m[0])
				reason, msg := v1alpha1.ReasonInvalid, "spec"+rest+": "+e.Msg
				if rest == ".credential" && strings.HasPrefix(e.Msg, "no credential named") {
					reason = v1alpha1.ReasonMissingCredential
					msg = fmt.Sprintf("spec.credential: no Credential %q is served with it (none accepted in %s)", u.Credential, where)
					if d, ok := defined[u.Credential]; ok {
						msg = fmt.Sprintf("spec.credential: Credential %s is not served (see its status)", d.ObjectKey)
					}
				}
				ref := ObjectRef{Kind: v1alpha1.KindUpstream}
				if i < len(ups) {
					ref = ups[i]
				}
				add(ref, reason, msg, fmt.Sprintf("upstream %s port %d: %s", u.Host, u.Port, e.Error()))
			} else if name, ok := credentialName(e.Path, b.Credentials); ok {
				dropCred[name] = true
				ref, ok := origin.credentials[name]
				if !ok {
					ref = ObjectRef{v1alpha1.KindCredential, ObjectKey{Name: name}}
				}
				rest := strings.TrimPrefix(e.Path, "credentials."+name)
				add(ref, v1alpha1.ReasonInvalid, "spec"+rest+": "+e.Msg, fmt.Sprintf("credential %s: %s", name, e.Error()))
			}
		}
		if len(dropUp) == 0 && len(dropCred) == 0 {
			break // nothing attributable: the sidecar decides
		}
		for _, ref := range order {
			out = append(out, *byRef[ref])
		}
		var keptUp []config.Upstream
		var keptRefs []ObjectRef
		for i, u := range b.Upstreams {
			if !dropUp[i] {
				keptUp = append(keptUp, u)
				if i < len(ups) {
					keptRefs = append(keptRefs, ups[i])
				}
			}
		}
		b.Upstreams, ups = keptUp, keptRefs
		if len(dropCred) > 0 {
			creds := make(map[string]config.Credential, len(b.Credentials))
			for n, c := range b.Credentials {
				if !dropCred[n] {
					creds[n] = c
				}
			}
			b.Credentials = creds
		}
	}
	if len(b.Credentials) == 0 {
		b.Credentials = nil
	}
	return b, out
}

var upstreamPath = regexp.MustCompile(`^upstreams\[(\d+)\]`)

// credentialName finds which credential a path such as "credentials.gh.static.file" is about
// (names may contain dots, so the longest match wins).
func credentialName(path string, creds map[string]config.Credential) (string, bool) {
	rest, ok := strings.CutPrefix(path, "credentials.")
	if !ok {
		return "", false
	}
	best := ""
	for n := range creds {
		if (rest == n || strings.HasPrefix(rest, n+".") || strings.HasPrefix(rest, n+"[")) && len(n) > len(best) {
			best = n
		}
	}
	return best, best != ""
}

// configErrors validates b's upstreams and credentials as the sidecar will, on a copy (Validate
// fills defaults into what it checks), in a config whose other keys are valid.
func configErrors(b bundle.Bundle) config.Errors {
	raw, err := json.Marshal(struct {
		Upstreams   []config.Upstream            `json:"upstreams,omitempty"`
		Credentials map[string]config.Credential `json:"credentials,omitempty"`
	}{b.Upstreams, b.Credentials})
	if err != nil {
		return nil
	}
	var c config.Config
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil
	}
	c.Identity.Static = "spiffe://controller.invalid/validation"
	c.Policy.Dir = "xds"
	var errs config.Errors
	if err := c.Validate(); err != nil && !errors.As(err, &errs) {
		return nil
	}
	return slices.DeleteFunc(errs, func(e config.FieldError) bool {
		return !strings.HasPrefix(e.Path, "upstreams[") && !strings.HasPrefix(e.Path, "credentials.")
	})
}
