package v1alpha1

import (
	"fmt"
	"reflect"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/escrowproxy/escrow/config"
	"github.com/escrowproxy/escrow/controlplane/bundle"
)

// CustomResourceDefinitions returns the four CRDs as YAML documents, keyed by file name
// ("escrow.dev_policies.yaml", ...). The chart's crds/ directory holds exactly these (a test
// compares them), generated from the Go types so that the API server's validation and the
// controller's decoding agree on every field.
func CustomResourceDefinitions() (map[string][]byte, error) {
	out := map[string][]byte{}
	for _, d := range definitions() {
		doc, err := d.yaml()
		if err != nil {
			return nil, err
		}
		out[Group+"_"+d.plural+".yaml"] = doc
	}
	return out, nil
}

type definition struct {
	kind, plural, singular string
	short                  []string
	spec                   map[string]any
	status                 map[string]any // nil: no status subresource
	columns                []map[string]any
}

func definitions() []definition {
	cedarSpec := obj(map[string]any{
		"cedar": map[string]any{"type": "string", "minLength": 1, "maxLength": maxPolicyBytes,
			"description": "Cedar policies, each with an @id annotation, validated against escrow's built-in schema."},
	}, "cedar")

	upstream := schemaOf(reflect.TypeFor[config.Upstream](), "")
	props := upstream["properties"].(map[string]any)
	props["host"].(map[string]any)["minLength"] = 1
	props["host"].(map[string]any)["maxLength"] = 253
	props["port"].(map[string]any)["minimum"] = 1
	props["port"].(map[string]any)["maximum"] = 65535

	cred := schemaOf(reflect.TypeFor[CredentialSpec](), "")
	cred["minProperties"] = 1
	cred["maxProperties"] = 1
	cred["description"] = "Exactly one provider, as in the config file's credentials.<name>; secrets are references to Secrets of this namespace."

	spiffeItems := map[string]any{"type": "string", "maxLength": 2048, "pattern": `^spiffe://[a-z0-9._-]+(/.*)?$`}
	list := func(items map[string]any) map[string]any {
		return map[string]any{"type": "array", "minItems": 1, "maxItems": 1000, "items": items,
			"x-kubernetes-list-type": "set"}
	}
	revocation := obj(map[string]any{
		"spiffe_ids":         list(spiffeItems),
		"spiffe_id_prefixes": list(spiffeItems),
		"credentials":        list(map[string]any{"type": "string", "minLength": 1, "maxLength": 253}),
		"reason":             map[string]any{"type": "string", "maxLength": 1024},
	})
	revocation["x-kubernetes-validations"] = []any{map[string]any{
		"rule":    "has(self.spiffe_ids) || has(self.spiffe_id_prefixes) || has(self.credentials)",
		"message": "a Revocation names at least one of spiffe_ids, spiffe_id_prefixes, credentials",
	}}

	age := map[string]any{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
	// Every kind's status: whether the controller serves it, and why not.
	accepted := map[string]any{"name": "Accepted", "type": "string", "jsonPath": `.status.conditions[?(@.type=="Accepted")].status`}
	reason := map[string]any{"name": "Reason", "type": "string", "jsonPath": `.status.conditions[?(@.type=="Accepted")].reason`}
	message := map[string]any{"name": "Message", "type": "string", "priority": 1, "jsonPath": `.status.conditions[?(@.type=="Accepted")].message`}
	return []definition{
		{
			kind: KindPolicy, plural: "policies", singular: "policy", short: []string{"escpol"},
			spec:    cedarSpec,
			status:  statusSchema(),
			columns: []map[string]any{accepted, reason, message, age},
		},
		{
			kind: KindUpstream, plural: "upstreams", singular: "upstream", short: []string{"escup"},
			spec: upstream, status: statusSchema(),
			columns: []map[string]any{
				{"name": "Host", "type": "string", "jsonPath": ".spec.host"},
				{"name": "Port", "type": "integer", "jsonPath": ".spec.port"},
				{"name": "Tunnel", "type": "boolean", "jsonPath": ".spec.tunnel"},
				{"name": "Credential", "type": "string", "jsonPath": ".spec.credential"},
				accepted, reason, message,
				age,
			},
		},
		{
			kind: KindCredential, plural: "credentials", singular: "credential", short: []string{"esccred"},
			spec: cred, status: statusSchema(),
			columns: []map[string]any{
				{"name": "Secret", "type": "string", "jsonPath": ".spec.static.secret_ref.name"},
				accepted, reason,
				{"name": "Token-URL", "type": "string", "priority": 1, "jsonPath": ".spec.oauth2.token_url"},
				message,
				age,
			},
		},
		{
			kind: KindRevocation, plural: "revocations", singular: "revocation", short: []string{"escrev"},
			spec: revocation, status: statusSchema(),
			columns: []map[string]any{
				// Reason is the operator's (spec.reason), as before; the controller's is
				// Accepted-Reason.
				accepted,
				{"name": "Accepted-Reason", "type": "string", "jsonPath": `.status.conditions[?(@.type=="Accepted")].reason`},
				{"name": "Reason", "type": "string", "jsonPath": ".spec.reason"},
				{"name": "SPIFFE-IDs", "type": "string", "jsonPath": ".spec.spiffe_ids"},
				{"name": "Prefixes", "type": "string", "jsonPath": ".spec.spiffe_id_prefixes"},
				{"name": "Credentials", "type": "string", "jsonPath": ".spec.credentials"},
				message,
				age,
			},
		},
	}
}

// maxPolicyBytes bounds a Policy's text as the wire contract does.
const maxPolicyBytes = bundle.MaxPolicyBytes

func (d definition) yaml() ([]byte, error) {
	root := obj(map[string]any{
		"apiVersion": map[string]any{"type": "string"},
		"kind":       map[string]any{"type": "string"},
		"metadata":   map[string]any{"type": "object"},
		"spec":       d.spec,
	}, "spec")
	version := map[string]any{
		"name": Version, "served": true, "storage": true,
		"schema":                   map[string]any{"openAPIV3Schema": root},
		"additionalPrinterColumns": d.columns,
	}
	if d.status != nil {
		root["properties"].(map[string]any)["status"] = d.status
		version["subresources"] = map[string]any{"status": map[string]any{}}
	}
	crd := map[string]any{
		"apiVersion": "apiextensions.k8s.io/v1",
		"kind":       "CustomResourceDefinition",
		"metadata":   map[string]any{"name": d.plural + "." + Group},
		"spec": map[string]any{
			"group": Group,
			"scope": "Namespaced",
			"names": map[string]any{
				"kind": d.kind, "listKind": d.kind + "List", "plural": d.plural, "singular": d.singular,
				"shortNames": d.short, "categories": []string{"escrow"},
			},
			"versions": []any{version},
		},
	}
	body, err := yaml.Marshal(crd)
	if err != nil {
		return nil, fmt.Errorf("v1alpha1: %s: %w", d.kind, err)
	}
	head := "# Generated from the Go types in controlplane/api/v1alpha1 by\n" +
		"#   go test ./controlplane/api/v1alpha1 -run TestCRDs_MatchTheChart -update\n" +
		"# Do not edit by hand.\n"
	return append([]byte(head), body...), nil
}

// statusSchema is every kind's status: metav1.Condition's schema, as Kubernetes' own types have it.
func statusSchema() map[string]any {
	cond := obj(map[string]any{
		"type":               map[string]any{"type": "string", "maxLength": 316},
		"status":             map[string]any{"type": "string", "enum": []string{"True", "False", "Unknown"}},
		"observedGeneration": map[string]any{"type": "integer", "format": "int64", "minimum": 0},
		"lastTransitionTime": map[string]any{"type": "string", "format": "date-time"},
		"reason":             map[string]any{"type": "string", "maxLength": 1024},
		"message":            map[string]any{"type": "string", "maxLength": 32768},
	}, "type", "status", "lastTransitionTime", "reason", "message")
	return obj(map[string]any{
		"observedGeneration": map[string]any{"type": "integer", "format": "int64"},
		"conditions": map[string]any{
			"type": "array", "items": cond,
			"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": []string{"type"},
		},
	})
}

func obj(props map[string]any, required ...string) map[string]any {
	s := map[string]any{"type": "object", "properties": props}
	if len(required) > 0 {
		s["required"] = required
	}
	return s
}

// Types with a schema of their own rather than their Go shape.
var durationType = reflect.TypeFor[config.Duration]()

// schemaOf is the structural OpenAPI schema of t as encoding/json reads it: a field's JSON
// name from its tag, embedded structs (tag ",inline" or none) flattened, fields without
// omitempty required. Unexported fields are not part of the format.
func schemaOf(t reflect.Type, at string) map[string]any {
	if t == durationType {
		return map[string]any{"type": "string", "pattern": `^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$`,
			"description": "a Go duration, e.g. 30s, 5m, 1h30m"}
	}
	switch t.Kind() {
	case reflect.Pointer:
		return schemaOf(t.Elem(), at)
	case reflect.String:
		return map[string]any{"type": "string"}
	case reflect.Bool:
		return map[string]any{"type": "boolean"}
	case reflect.Int, reflect.Int32:
		return map[string]any{"type": "integer"}
	case reflect.Int64:
		return map[string]any{"type": "integer", "format": "int64"}
	case reflect.Slice:
		return map[string]any{"type": "array", "items": schemaOf(t.Elem(), at+"[]")}
	case reflect.Map:
		if t.Key().Kind() != reflect.String {
			panic("v1alpha1: map key of " + at + " is not a string")
		}
		return map[string]any{"type": "object", "additionalProperties": schemaOf(t.Elem(), at+"{}")}
	case reflect.Struct:
		props := map[string]any{}
		var required []string
		var walk func(t reflect.Type)
		walk = func(t reflect.Type) {
			for f := range t.Fields() {
				tag := f.Tag.Get("json")
				name, opts, _ := strings.Cut(tag, ",")
				if f.Anonymous && name == "" {
					walk(f.Type)
					continue
				}
				if !f.IsExported() || name == "-" {
					continue
				}
				if name == "" {
					name = f.Name
				}
				if replaced[name] && fileFieldOwners[t] {
					continue // a path where the CRD takes a Secret reference
				}
				props[name] = schemaOf(f.Type, at+"."+name)
				if !strings.Contains(opts, "omitempty") {
					required = append(required, name)
				}
			}
		}
		walk(t)
		s := map[string]any{"type": "object", "properties": props}
		if len(required) > 0 {
			s["required"] = required
		}
		return s
	}
	panic(fmt.Sprintf("v1alpha1: no schema for %s (%s)", at, t))
}

// The config keys that hold secret file paths, and the config types that have them: in a
// Credential object these are Secret references instead (see CredentialSpec).
var (
	replaced        = map[string]bool{"client_secret_file": true, "private_key_file": true}
	fileFieldOwners = map[reflect.Type]bool{
		reflect.TypeFor[config.OAuth2]():        true,
		reflect.TypeFor[config.TokenExchange](): true,
		reflect.TypeFor[config.GitHubApp]():     true,
	}
)
