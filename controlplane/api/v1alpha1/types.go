// Package v1alpha1 holds the Go types of escrow's Kubernetes resources (group escrow.dev,
// version v1alpha1): Policy, Upstream, Credential and Revocation, all namespaced.
//
// The types are plain structs with JSON tags. The controller reads them from the API server as
// unstructured objects and converts them with [Decode] (strict: a field this version does not
// know is an error, not silently dropped), so no generated deepcopy or clientset is needed. The
// CustomResourceDefinitions in the Helm chart are generated from these types
// ([CustomResourceDefinitions]), so the OpenAPI schema and the Go types cannot drift apart.
//
// The spec of an Upstream is an upstreams[] entry of escrow's config file, key for key, and the
// spec of a Credential is a credentials.<name> entry, except that secrets are references to
// Kubernetes Secrets ([SecretKeyRef]) instead of file paths (see [CredentialSpec]). One
// reference page (docs/config.md) thus describes both.
package v1alpha1

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path"
	"regexp"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/escrowproxy/escrow/config"
)

// Group and Version of escrow's resources.
const (
	Group   = "escrow.dev"
	Version = "v1alpha1"
)

// Kinds.
const (
	KindPolicy     = "Policy"
	KindUpstream   = "Upstream"
	KindCredential = "Credential"
	KindRevocation = "Revocation"
)

// GroupVersion is escrow.dev/v1alpha1.
var GroupVersion = schema.GroupVersion{Group: Group, Version: Version}

// Resources, for the dynamic client and informers.
var (
	PolicyResource     = GroupVersion.WithResource("policies")
	UpstreamResource   = GroupVersion.WithResource("upstreams")
	CredentialResource = GroupVersion.WithResource("credentials")
	RevocationResource = GroupVersion.WithResource("revocations")
)

// Policy is Cedar text the controller validates against escrow's built-in schema before it
// serves it. Its status says whether it was accepted, and why not (with line and column).
type Policy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              PolicySpec `json:"spec"`
	Status            Status     `json:"status,omitempty"`
}

// PolicySpec holds the Cedar text: one or more policies, each with an @id.
type PolicySpec struct {
	Cedar string `json:"cedar"`
}

// Status is the status of every kind, written by the controller (the status subresource).
type Status struct {
	// ObservedGeneration is the generation the conditions describe.
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions holds ConditionAccepted.
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// PolicyStatus is the Policy's Status (the name it had before every kind had one).
type PolicyStatus = Status

// ConditionAccepted is the condition that says whether the controller serves the object: True
// when it is in at least one namespace's bundle, False (with why) when it is in none.
const ConditionAccepted = "Accepted"

// Reasons of ConditionAccepted. They are stable: scripts and alerts may match them.
const (
	// ReasonValid: served to every sidecar that receives the object's namespace.
	ReasonValid = "Valid"
	// ReasonPartiallyServed (Accepted=True): a cluster-wide object served to some namespaces
	// and left out of the others' bundles, typically an Upstream naming a Credential that only
	// some namespaces define. The message names where it is served and why not elsewhere.
	ReasonPartiallyServed = "PartiallyServed"
	// ReasonInvalid: the sidecar's validation would refuse it (a Policy that does not parse,
	// lacks an @id or does not match the schema; a bad header name; a token URL that is not a
	// URL); the message gives the key path.
	ReasonInvalid = "Invalid"
	// ReasonDuplicateID: a policy @id is already used by another Policy that a sidecar would
	// receive together with this one (the one that keeps it is named in the message).
	ReasonDuplicateID = "DuplicateID"
	// ReasonConflict: an Upstream for the host and port of another one that wins (a
	// cluster-wide one, or the one whose name sorts first), or a Credential with the name of a
	// cluster-wide one.
	ReasonConflict = "Conflict"
	// ReasonBadSecretRef: a Credential's Secret reference is not a Secret name and key.
	ReasonBadSecretRef = "BadSecretRef"
	// ReasonMissingCredential: an Upstream names a Credential that is not served with it.
	ReasonMissingCredential = "MissingCredential"
	// ReasonUndecodable: the object has fields this controller version does not know.
	ReasonUndecodable = "Undecodable"
	// ReasonEmpty: a Revocation that names no SPIFFE ID, prefix or credential.
	ReasonEmpty = "Empty"
)

// Upstream is one upstreams[] entry of escrow's config, served to the sidecars that receive
// its namespace. Its CA file, if any, is a path in the sidecar's container.
type Upstream struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              config.Upstream `json:"spec"`
	Status            Status          `json:"status,omitempty"`
}

// Credential is one credentials.<name> entry of escrow's config; the entry's name is the
// object's name. Secrets are references to Kubernetes Secrets of the object's namespace.
type Credential struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              CredentialSpec `json:"spec"`
	Status            Status         `json:"status,omitempty"`
}

// CredentialSpec mirrors config.Credential (exactly one provider), with every secret a
// reference to a key of a Secret in the Credential's namespace instead of a file:
//
//	static:         {secret_ref: {name, key}}         (instead of file/env)
//	oauth2:         client_secret_ref: {name, key}    (instead of client_secret_file)
//	token_exchange: client_secret_ref: {name, key}    (instead of client_secret_file)
//	github_app:     private_key_ref: {name, key}      (instead of private_key_file)
//
// How a reference reaches the sidecar: [SecretFile] (the Secret is mounted into the escrow
// container alone, never the agent's). Providers without a root secret (JWT-SVID based ones)
// are the config's blocks unchanged.
type CredentialSpec struct {
	Static        *StaticSpec        `json:"static,omitempty"`
	OAuth2        *OAuth2Spec        `json:"oauth2,omitempty"`
	TokenExchange *TokenExchangeSpec `json:"token_exchange,omitempty"`
	AWS           *config.AWS        `json:"aws,omitempty"`
	GitHubApp     *GitHubAppSpec     `json:"github_app,omitempty"`
	Vault         *config.Vault      `json:"vault,omitempty"`
	GCP           *config.GCP        `json:"gcp,omitempty"`
	Azure         *config.Azure      `json:"azure,omitempty"`
}

// SecretKeyRef names one key of a Secret in the referring object's namespace.
type SecretKeyRef struct {
	Name string `json:"name"`
	Key  string `json:"key"`
}

// StaticSpec is a long-lived secret held in a Secret.
type StaticSpec struct {
	SecretRef SecretKeyRef `json:"secret_ref"`
}

// OAuth2Spec is config.OAuth2 with the client secret as a reference.
type OAuth2Spec struct {
	config.OAuth2   `json:",inline"`
	ClientSecretRef *SecretKeyRef `json:"client_secret_ref,omitempty"`
}

// TokenExchangeSpec is config.TokenExchange with the client secret as a reference.
type TokenExchangeSpec struct {
	config.TokenExchange `json:",inline"`
	ClientSecretRef      *SecretKeyRef `json:"client_secret_ref,omitempty"`
}

// GitHubAppSpec is config.GitHubApp with the private key as a reference.
type GitHubAppSpec struct {
	config.GitHubApp `json:",inline"`
	PrivateKeyRef    SecretKeyRef `json:"private_key_ref"`
}

// Revocation denies identities and drops credentials while it exists. At least one of
// SPIFFEIDs, SPIFFEIDPrefixes and Credentials is set (the CRD's schema enforces it).
type Revocation struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              RevocationSpec `json:"spec"`
	Status            Status         `json:"status,omitempty"`
}

// RevocationSpec mirrors bundle.Revocation.
type RevocationSpec struct {
	SPIFFEIDs        []string `json:"spiffe_ids,omitempty"`
	SPIFFEIDPrefixes []string `json:"spiffe_id_prefixes,omitempty"`
	Credentials      []string `json:"credentials,omitempty"`
	Reason           string   `json:"reason,omitempty"`
}

// SecretsDir is where the sidecar finds referenced Secrets: key K of Secret S is the file
// SecretsDir/S/K, a volume of the Secret mounted read-only into the escrow container only. It
// is deliberately not below the CA directory, which the agent's containers mount.
const SecretsDir = "/var/run/escrow-secrets"

// SecretFile is the path in the sidecar's container where ref's value is read.
func SecretFile(ref SecretKeyRef) string { return path.Join(SecretsDir, ref.Name, ref.Key) }

// Secret names are DNS subdomains; keys are what Kubernetes allows in a Secret's data.
var (
	secretNameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
	secretKeyRE  = regexp.MustCompile(`^[-._a-zA-Z0-9]+$`)
)

// Check reports why ref cannot name a Secret's key (which also keeps SecretFile inside
// SecretsDir: no "/", no "." or ".." key).
func (ref SecretKeyRef) Check() error {
	switch {
	case len(ref.Name) > 253 || !secretNameRE.MatchString(ref.Name):
		return fmt.Errorf("name %q is not a Secret name", ref.Name)
	case len(ref.Key) > 253 || !secretKeyRE.MatchString(ref.Key) || ref.Key == "." || strings.HasPrefix(ref.Key, ".."):
		return fmt.Errorf("key %q is not a Secret key", ref.Key)
	}
	return nil
}

// SpecError is why a CredentialSpec is not a config entry: each problem at its key path
// below spec.
type SpecError struct{ Problems []SpecProblem }

// SpecProblem is one problem of a SpecError.
type SpecProblem struct {
	Path string // e.g. static.secret_ref
	Msg  string
	// BadRef: a Secret reference that is not a Secret name and key (otherwise a key the
	// Credential object does not allow).
	BadRef bool
}

func (e *SpecError) Error() string {
	msgs := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		msgs[i] = p.Path + ": " + p.Msg
	}
	return "v1alpha1: " + strings.Join(msgs, "; ")
}

// Config is the credentials.<name> entry this spec stands for, each secret reference turned
// into the file where the sidecar reads it (SecretFile). A file key that the CRD does not
// allow (a path instead of a reference) is an error, as is a bad reference: a *SpecError.
func (s CredentialSpec) Config() (config.Credential, error) {
	var c config.Credential
	var errs []SpecProblem
	ref := func(at string, r *SecretKeyRef) string {
		if r == nil {
			return ""
		}
		if err := r.Check(); err != nil {
			errs = append(errs, SpecProblem{Path: at, Msg: err.Error(), BadRef: true})
			return ""
		}
		return SecretFile(*r)
	}
	noFile := func(at, v, instead string) {
		if v != "" {
			errs = append(errs, SpecProblem{Path: at, Msg: fmt.Sprintf("not allowed in a Credential object; use %s (a Secret reference)", instead)})
		}
	}
	if s.Static != nil {
		c.Static = &config.Static{File: ref("static.secret_ref", &s.Static.SecretRef)}
	}
	if s.OAuth2 != nil {
		o := s.OAuth2.OAuth2
		noFile("oauth2.client_secret_file", o.ClientSecretFile, "client_secret_ref")
		o.ClientSecretFile = ref("oauth2.client_secret_ref", s.OAuth2.ClientSecretRef)
		c.OAuth2 = &o
	}
	if s.TokenExchange != nil {
		t := s.TokenExchange.TokenExchange
		noFile("token_exchange.client_secret_file", t.ClientSecretFile, "client_secret_ref")
		t.ClientSecretFile = ref("token_exchange.client_secret_ref", s.TokenExchange.ClientSecretRef)
		c.TokenExchange = &t
	}
	if s.GitHubApp != nil {
		g := s.GitHubApp.GitHubApp
		noFile("github_app.private_key_file", g.PrivateKeyFile, "private_key_ref")
		g.PrivateKeyFile = ref("github_app.private_key_ref", &s.GitHubApp.PrivateKeyRef)
		c.GitHubApp = &g
	}
	c.AWS, c.Vault, c.GCP, c.Azure = s.AWS, s.Vault, s.GCP, s.Azure
	if len(errs) > 0 {
		return config.Credential{}, &SpecError{Problems: errs}
	}
	return c, nil
}

// Decode converts an object read from the API server (an unstructured object's content) into
// T, one of Policy, Upstream, Credential, Revocation. It is strict: a field T does not have is
// an error, so a newer CRD's intent is never half applied. (It goes through JSON rather than
// runtime.DefaultUnstructuredConverter, which cannot fill types with unexported fields, as
// config.Upstream has, and would bypass config.Duration's own decoding.)
func Decode[T any](obj map[string]any) (*T, error) {
	raw, err := json.Marshal(obj)
	if err != nil {
		return nil, fmt.Errorf("v1alpha1: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	out := new(T)
	if err := dec.Decode(out); err != nil {
		return nil, fmt.Errorf("v1alpha1: %w", err)
	}
	return out, nil
}

// Encode is the inverse of Decode: v (an object, or part of one such as a status) as the
// unstructured content the dynamic client sends. It goes through JSON for the same reasons.
func Encode(v any) (map[string]any, error) {
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("v1alpha1: %w", err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("v1alpha1: %w", err)
	}
	return m, nil
}
