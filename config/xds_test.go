package config

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestParse_XDSFillsDefaultsAndMakesPolicyDirOptional(t *testing.T) {
	c, err := Parse([]byte(`
identity: {spiffe: {socket: unix:///run/spire/agent.sock}}
xds: {address: escrow-controller.escrow.svc:15490}
`))
	if err != nil {
		t.Fatal(err)
	}
	x := c.XDS
	if x.Address != "escrow-controller.escrow.svc:15490" || x.NodeIDFrom != XDSNodeIDFromSVID || x.MaxBackoff.D() != DefaultXDSMaxBackoff || x.ServerID != "" {
		t.Fatalf("xds = %+v", *x)
	}
	if c.Policy.Dir != "" {
		t.Fatalf("policy.dir = %q", c.Policy.Dir)
	}
}

func TestParse_XDSErrorsNameTheirKeys(t *testing.T) {
	for doc, want := range map[string]string{
		"identity: {static: spiffe://example.org/a}\nxds: {address: c:1}\n":                                      "xds: needs identity.spiffe",
		"identity: {spiffe: {}}\nxds: {}\n":                                                                      "xds.address: required",
		"identity: {spiffe: {}}\nxds: {address: controller}\n":                                                   "xds.address: want host:port",
		"identity: {spiffe: {}}\nxds: {address: ':15490'}\n":                                                     "xds.address: want host:port",
		"identity: {spiffe: {}}\nxds: {address: 'c:0'}\n":                                                        "xds.address: invalid port",
		"identity: {spiffe: {}}\nxds: {address: c:1, node_id_from: header}\n":                                    "xds.node_id_from: want svid",
		"identity: {spiffe: {}}\nxds: {address: c:1, server_id: controller}\n":                                   "xds.server_id: want a SPIFFE ID",
		"identity: {spiffe: {}}\nxds: {address: c:1, max_backoff: 10ms}\n":                                       "xds.max_backoff: must be between 1s and 10m",
		"identity: {spiffe: {}}\nxds: {address: c:1, nodeid: x}\n":                                               "xds.nodeid",
		"identity: {static: spiffe://example.org/a}\n":                                                           "policy.dir: required",
		"identity: {spiffe: {}}\nxds: {address: c:1}\nupstreams: [{host: a.example.com, credential: missing}]\n": "upstreams[0].credential: no credential named",
	} {
		_, err := Parse([]byte(doc))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s\n  error %v\n  want %q", doc, err, want)
		}
	}
}

func TestParse_XDSAcceptsAServerIDAndBackoff(t *testing.T) {
	c, err := Parse([]byte("identity: {spiffe: {}}\npolicy: {dir: p}\nxds: {address: '[::1]:15490', server_id: spiffe://example.org/ns/escrow/sa/controller, max_backoff: 5s}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.XDS.MaxBackoff.D() != 5*time.Second || c.XDS.ServerID != "spiffe://example.org/ns/escrow/sa/controller" {
		t.Fatalf("xds = %+v", *c.XDS)
	}
}

// The control-plane subscriber validates a pushed config by writing the file's config back as
// JSON, adding the pushed parts, and parsing the result as a file: the round trip must be exact.
func TestConfig_JSONRoundTripParsesToTheSameConfig(t *testing.T) {
	src := `
identity: {spiffe: {socket: unix:///s}}
xds: {address: c:1, max_backoff: 2s}
audit: {flush_interval: 0s}
delegation: {audience: a, issuers: [{spiffe: {}}], max_depth: 0}
upstreams:
  - host: api.example.com
    credential: k
    inject: {header: X-Key, value: "k={{.Token}}"}
    response_timeout: 3s
    scrub_responses: false
    mcp: {}
  - host: pypi.org
    tunnel: true
credentials:
  k: {static: {file: /s}}
egress: {allow_cidrs: [10.0.0.0/8]}
`
	a, err := Parse([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Parse(raw)
	if err != nil {
		t.Fatalf("%s\n%v", raw, err)
	}
	raw2, _ := json.Marshal(b)
	if string(raw) != string(raw2) {
		t.Fatalf("round trip changed the config:\n%s\n%s", raw, raw2)
	}
	if b.Upstreams[0].Injection() != a.Upstreams[0].Injection() || *b.Delegation.MaxDepth != 0 || b.Audit.FlushEvery() != 0 {
		t.Fatalf("compiled values differ: %+v vs %+v", b.Upstreams[0].Injection(), a.Upstreams[0].Injection())
	}
}

func TestParse_BrokerCredentialWithXDSAppliesAsABearerToken(t *testing.T) {
	c, err := Parse([]byte(`
identity: {spiffe: {}}
xds: {address: c:1}
credentials: {github: {broker: {}}}
upstreams: [{host: api.github.com, credential: github}]
`))
	if err != nil {
		t.Fatal(err)
	}
	cr := c.Credentials["github"]
	if cr.Broker == nil || cr.Provider() != ProviderBroker || len(cr.Files("credentials.github")) != 0 {
		t.Fatalf("credentials.github = %+v (provider %q)", cr, cr.Provider())
	}
	if in := c.Upstreams[0].Injection(); in.Kind != InjectHeader || in.Header != "Authorization" || in.Prefix != "Bearer " {
		t.Fatalf("injection = %+v", in)
	}
}

func TestParse_BrokerCredentialErrorsNameTheirKeys(t *testing.T) {
	for doc, want := range map[string]string{
		"identity: {spiffe: {}}\npolicy: {dir: p}\ncredentials: {gh: {broker: {}}}\n":                                        "credentials.gh.broker: needs xds",
		"identity: {spiffe: {}}\nxds: {address: c:1}\ncredentials: {gh: {broker: {}, static: {env: X}}}\n":                   "credentials.gh: set exactly one provider, not static and broker",
		"identity: {spiffe: {}}\nxds: {address: c:1}\ncredentials: {gh: {broker: {credential: gh}}}\n":                       "credentials.gh.broker.credential",
		"identity: {spiffe: {}}\nxds: {address: c:1}\ncredentials: {gh: {broker: {spiffe_ids: [spiffe://example.org/a]}}}\n": "credentials.gh.broker.spiffe_ids",
	} {
		_, err := Parse([]byte(doc))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s\n  error %v\n  want %q", doc, err, want)
		}
	}
}
