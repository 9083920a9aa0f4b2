package sidecar

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/policy"
)

// noPoliciesName and noPolicies are the set in force when neither the sidecar's file nor the
// control plane has any policy: every request is denied by policy. An empty set is the
// controller's intent (every Policy object deleted); keeping the last good set instead would
// go on allowing what the operator removed.
const (
	noPoliciesName = "escrow-xds-no-policies.cedar"
	noPolicies     = `@id("escrow.xds.no-policies") forbid (principal, action, resource);`
)

// merged is a bundle made whole with the sidecar's own config: what Apply receives.
type merged struct {
	config   *config.Config
	source   policy.Source
	policies *policy.Set
}

// merge adds the bundle's upstreams, credentials and policies to the base ones and validates the
// result exactly as a file would be: the config through config.Parse (from its JSON, so every
// check of a file applies, key paths included), the policies compiled as one set with the
// sidecar's schema. A name defined in both is an error, never a silent override.
func merge(base *config.Config, basePolicies policy.Source, b bundle.Bundle) (merged, error) {
	var clash []string
	for _, n := range slices.Sorted(maps.Keys(b.Credentials)) {
		if _, ok := base.Credentials[n]; ok {
			clash = append(clash, fmt.Sprintf("credentials.%s: defined in the sidecar's config file and pushed by the control plane", n))
		}
	}
	for _, n := range slices.Sorted(maps.Keys(b.Policies)) {
		if _, ok := basePolicies.Policies[n]; ok {
			clash = append(clash, fmt.Sprintf("policies[%q]: in the sidecar's policy.dir and pushed by the control plane", n))
		}
	}
	if len(clash) > 0 {
		return merged{}, fmt.Errorf("controlplane: %s", strings.Join(clash, "; "))
	}

	c := *base
	c.Upstreams = append(slices.Clone(base.Upstreams), b.Upstreams...)
	c.Credentials = make(map[string]config.Credential, len(base.Credentials)+len(b.Credentials))
	maps.Copy(c.Credentials, base.Credentials)
	maps.Copy(c.Credentials, b.Credentials)
	raw, err := json.Marshal(&c)
	if err != nil {
		return merged{}, fmt.Errorf("controlplane: config: %w", err)
	}
	cfg, err := config.Parse(raw)
	if err != nil {
		return merged{}, fmt.Errorf("controlplane: %w", err)
	}

	src := policy.Source{Origin: "xds", Policies: make(map[string][]byte, len(basePolicies.Policies)+len(b.Policies)), Schema: basePolicies.Schema}
	for n, text := range basePolicies.Policies {
		src.Policies[n] = text
	}
	for n, text := range b.Policies {
		src.Policies[n] = []byte(text)
	}
	if len(src.Policies) == 0 {
		src.Policies[noPoliciesName] = []byte(noPolicies)
	}
	set, err := policy.Compile(src)
	if err != nil {
		return merged{}, err
	}
	return merged{config: cfg, source: src, policies: set}, nil
}

// reason is the text of a NACK: the error, bounded (the controller stores it in a status and
// a metric's reason class; Cedar errors can be long).
func reason(err error) string {
	const maxReason = 4 << 10
	s := err.Error()
	if len(s) > maxReason {
		s = s[:maxReason] + "…"
	}
	return s
}

// names returns the sorted keys of m, for logs.
func names[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
