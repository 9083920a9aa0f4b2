package injector

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/escrowproxy/escrow/config"
)

func TestParseConfig_Defaults(t *testing.T) {
	for _, data := range []string{"", "{}", "# only a comment\n"} {
		c, err := ParseConfig([]byte(data), Defaults{})
		if err != nil {
			t.Fatalf("%q: %v", data, err)
		}
		want := Config{
			Image: "escrowproxy/escrow:latest", ImagePullPolicy: "IfNotPresent",
			Resources:       Resources{Requests: map[string]Quantity{"cpu": "50m", "memory": "64Mi"}, Limits: map[string]Quantity{"memory": "256Mi"}},
			ProxyPort:       15480,
			AdminPort:       15481,
			RunAsUser:       65532,
			ConfigMap:       "escrow-config",
			CADir:           config.DefaultCADir,
			CAKeyDir:        "/var/run/escrow-ca-key",
			Namespace:       "escrow-system",
			SPIFFE:          SPIFFE{Source: "csi", CSIDriver: "csi.spiffe.io", SocketName: "spire-agent.sock"},
			TrustEnv:        c.TrustEnv,
			NoProxy:         nil,
			PolicyConfigMap: "escrow-policies",
			ProcessIdentity: ProcessIdentity{Enabled: false, ConfigMap: "escrow-config-process"},
		}
		if c.TrustEnv == nil || !*c.TrustEnv {
			t.Error("trust_env does not default to true")
		}
		if !reflect.DeepEqual(*c, want) {
			t.Errorf("%q:\n got %+v\nwant %+v", data, *c, want)
		}
	}
	c, err := ParseConfig(nil, Defaults{Image: "escrowproxy/escrow:v1.2.3", Namespace: "escrow"})
	if err != nil || c.Image != "escrowproxy/escrow:v1.2.3" || c.Namespace != "escrow" {
		t.Fatalf("Defaults not applied: %+v %v", c, err)
	}
	c, err = ParseConfig([]byte("namespace: mine\n"), Defaults{Namespace: "escrow"})
	if err != nil || c.Namespace != "mine" {
		t.Fatalf("the file does not win over Defaults: %+v %v", c, err)
	}
}

func TestParseConfig_EveryErrorWithItsPath(t *testing.T) {
	_, err := ParseConfig([]byte(`
image: "bad image"
image_pull_policy: Sometimes
resources:
  requests: {cpu: lots, gpu: "1"}
  limits: {memory: [1]}
proxy_port: 70000
admin_port: 15480.5
run_as_user: 0
config_map: Bad_Name
ca_dir: relative/dir
service_cidrs: [10.96.0.0, 10.96.0.0/12]
no_proxy: ["a b", ok.example]
spiffe: {source: nfs, sockets: x}
trust_env: "yes"
imagePullPolicy: Always
`), Defaults{})
	var errs config.Errors
	if !errors.As(err, &errs) {
		t.Fatalf("err = %v, want config.Errors", err)
	}
	// Shape errors (unknown keys, wrong kinds) and the value errors of the keys decoded around
	// them come in one run, as for escrow's own config (config.Decode, config.Combine).
	want := []string{
		"admin_port: want an integer",
		"ca_dir: want a clean absolute directory path",
		"config_map: \"Bad_Name\" is not a valid name",
		"image: \"bad image\" contains whitespace",
		"imagePullPolicy: unknown key",
		"image_pull_policy: want Always, IfNotPresent or Never",
		"no_proxy[0]: \"a b\" contains a space",
		"proxy_port: want a port from 1 to 65535",
		"resources.limits.memory: want a quantity",
		// A wrongly typed value no longer stops the decoding: the keys after it are checked too.
		"resources.requests.cpu: \"lots\" is not a quantity",
		"resources.requests.gpu: want cpu, memory or ephemeral-storage",
		"service_cidrs[0]: want a CIDR",
		"spiffe.sockets: unknown key",
		"spiffe.source: want csi or hostPath",
		"trust_env: want true or false",
	}
	checkErrs(t, errs, want)

	_, err = ParseConfig([]byte(`
image: "bad image"
image_pull_policy: Sometimes
resources:
  requests: {cpu: lots, gpu: "1", memory: 1Gi}
  limits: {memory: 512Mi}
proxy_port: 70000
run_as_user: -1
config_map: Bad_Name
ca_key_dir: /var/run/escrow/key
service_cidrs: [10.96.0.0, 10.96.0.0/12]
no_proxy: ["a b", ok.example]
spiffe: {source: nfs}
`), Defaults{})
	if !errors.As(err, &errs) {
		t.Fatalf("err = %v, want config.Errors", err)
	}
	checkErrs(t, errs, []string{
		"ca_key_dir: must not be ca_dir",
		"config_map: \"Bad_Name\" is not a valid name",
		"image: \"bad image\" contains whitespace",
		"image_pull_policy: want Always, IfNotPresent or Never",
		"no_proxy[0]: \"a b\" contains a space",
		"proxy_port: want a port",
		"resources.requests.cpu: \"lots\" is not a quantity",
		"resources.requests.gpu: want cpu, memory or ephemeral-storage",
		"run_as_user: want a non-root uid",
		"service_cidrs[0]: want a CIDR",
		"spiffe.source: want csi or hostPath",
	})
}

func checkErrs(t *testing.T, errs config.Errors, want []string) {
	t.Helper()
	if len(errs) != len(want) {
		t.Errorf("%d errors, want %d:\n%v", len(errs), len(want), errs)
	}
	for _, w := range want {
		found := false
		for _, e := range errs {
			if strings.HasPrefix(e.Error(), w) {
				found = true
			}
		}
		if !found {
			t.Errorf("no error %q in:\n%v", w, errs)
		}
	}
}

func TestParseConfig_Values(t *testing.T) {
	c, err := ParseConfig([]byte(`
resources: {requests: {cpu: 0.5, memory: 100Mi}, limits: {cpu: 2}}
spiffe: {source: hostPath, host_path: /run/spire/sockets}
trust_env: false
`), Defaults{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Resources.Requests["cpu"] != "0.5" || c.Resources.Limits["cpu"] != "2" || c.Resources.Limits["memory"] != "" {
		t.Errorf("resources = %+v (numbers are quantities; a given map replaces the default)", c.Resources)
	}
	if *c.TrustEnv {
		t.Error("trust_env: false ignored")
	}
	c, err = ParseConfig([]byte("process_identity: {enabled: true, config_map: agents-process}\n"), Defaults{})
	if err != nil || !c.ProcessIdentity.Enabled || c.ProcessIdentity.ConfigMap != "agents-process" {
		t.Errorf("process_identity = %+v, %v", c.ProcessIdentity, err)
	}
	for data, want := range map[string]string{
		"spiffe: {source: hostPath}":                        "spiffe.host_path: required",
		"spiffe: {host_path: /x}":                           "spiffe.host_path: only with source: hostPath",
		"spiffe: {source: hostPath, host_path: /a/../b}":    "spiffe.host_path: want a clean absolute",
		"spiffe: {socket_name: a/b}":                        "spiffe.socket_name: want a file name",
		"resources: {requests: {cpu: 2}, limits: {cpu: 1}}": "resources: the cpu request 2 is above its limit 1",
		"admin_port: 15480":                                 "admin_port: must differ from proxy_port",
		"process_identity: {config_map: Not_A_Name}":        "process_identity.config_map: \"Not_A_Name\" is not a valid name",
		"process_identity: {enabled: \"on\"}":               "process_identity.enabled: want true or false",
		"process_identity: {enable: true}":                  "process_identity.enable: unknown key",
		"- a list":                                          "(root): want a mapping",
	} {
		_, err := ParseConfig([]byte(data), Defaults{})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: err = %v, want %q", data, err, want)
		}
	}
}

func TestLoadConfig(t *testing.T) {
	if c, err := LoadConfig("", Defaults{}); err != nil || c.Image == "" {
		t.Fatalf("no file: %+v %v", c, err)
	}
	if _, err := LoadConfig(filepath.Join(t.TempDir(), "missing.yaml"), Defaults{}); err == nil || !strings.HasPrefix(err.Error(), "injector: ") {
		t.Fatalf("missing file: %v", err)
	}
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte("image: x:1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if c, err := LoadConfig(p, Defaults{}); err != nil || c.Image != "x:1" {
		t.Fatalf("%+v %v", c, err)
	}
}
