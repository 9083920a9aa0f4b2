package controller

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/bundle"
)

// validateBundle drops from b the upstreams and credentials that the sidecar's config
// validation would refuse, and says why. A sidecar refuses a bundle whole (NACK) and keeps its
// last good one, so one tenant's mistake would otherwise hold back every later change for the
// namespace, a Revocation included. The checks are config.Validate's, on the bundle alone: an
// Upstream must name a Credential that is served with it (one in the sidecar's own file does
// not count, since the controller cannot see it). Dropping a credential can break an upstream
// that names it, so this repeats until nothing more is dropped.
func validateBundle(b bundle.Bundle) (bundle.Bundle, []string) {
	var why []string
	for range len(b.Upstreams) + len(b.Credentials) + 1 {
		errs := configErrors(b)
		if len(errs) == 0 {
			break
		}
		dropUp := map[int]bool{}
		dropCred := map[string]bool{}
		for _, e := range errs {
			if m := upstreamPath.FindStringSubmatch(e.Path); m != nil {
				i, _ := strconv.Atoi(m[1])
				if i < len(b.Upstreams) {
					dropUp[i] = true
					why = append(why, fmt.Sprintf("upstream %s port %d: %s", b.Upstreams[i].Host, b.Upstreams[i].Port, e.Error()))
				}
			} else if name, ok := credentialName(e.Path, b.Credentials); ok {
				dropCred[name] = true
				why = append(why, fmt.Sprintf("credential %s: %s", name, e.Error()))
			}
		}
		if len(dropUp) == 0 && len(dropCred) == 0 {
			break // nothing attributable: the sidecar decides
		}
		var ups []config.Upstream
		for i, u := range b.Upstreams {
			if !dropUp[i] {
				ups = append(ups, u)
			}
		}
		b.Upstreams = ups
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
	return b, why
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
