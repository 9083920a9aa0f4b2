package k8s_test

import (
	"context"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"sigs.k8s.io/yaml"

	"github.com/escrowproxy/escrow/attest/attesttest"
	"github.com/escrowproxy/escrow/controlplane/controller/controllertest"
)

const (
	controllerName = "escrow-controller"
	controllerAddr = controllerName + "." + releaseNS + ".svc:15490"
	controllerSA   = "system:serviceaccount:" + releaseNS + ":" + controllerName
)

// controllerObjects are the objects the chart renders for the control plane.
func controllerObjects(objs []object) []object {
	var r []object
	for _, o := range objs {
		if o.Metadata.Name == controllerName {
			r = append(r, o)
		}
	}
	return r
}

func named(t *testing.T, objs []object, kind, name string) object {
	t.Helper()
	for _, o := range find(objs, kind) {
		if o.Metadata.Name == name {
			return o
		}
	}
	t.Fatalf("no %s/%s in %s", kind, name, kinds(objs))
	return object{}
}

type clusterRole struct {
	Rules []struct {
		APIGroups []string `json:"apiGroups"`
		Resources []string `json:"resources"`
		Verbs     []string `json:"verbs"`
	} `json:"rules"`
}

// grants flattens a ClusterRole into "group/resource:verb" strings, sorted.
func (r clusterRole) grants() []string {
	var g []string
	for _, rule := range r.Rules {
		for _, grp := range rule.APIGroups {
			for _, res := range rule.Resources {
				for _, v := range rule.Verbs {
					g = append(g, grp+"/"+res+":"+v)
				}
			}
		}
	}
	sort.Strings(g)
	return g
}

// wantControllerGrants is exactly what `escrow controller` needs: read the four kinds, write a
// Policy's status (UpdateStatus). No Secrets cluster-wide (a Role grants get on those of its
// own namespace, for brokered Credentials), no create/delete, no patch.
var wantControllerGrants = func() []string {
	var g []string
	for _, res := range []string{"credentials", "policies", "revocations", "upstreams"} {
		for _, v := range []string{"get", "list", "watch"} {
			g = append(g, "escrow.dev/"+res+":"+v)
		}
	}
	g = append(g, "escrow.dev/policies/status:update", "escrow.dev/upstreams/status:update",
		"escrow.dev/credentials/status:update", "escrow.dev/revocations/status:update")
	sort.Strings(g)
	return g
}()

func TestChartController_OffByDefault(t *testing.T) {
	objs := render(t)
	if f := controllerObjects(objs); len(f) > 0 {
		t.Errorf("controller objects rendered although controller.enabled is false: %s", kinds(f))
	}
	for _, name := range []string{"escrow-config", "escrow-config-process"} {
		if cfg := configYAML(t, objs, releaseNS, name); cfg["xds"] != nil {
			t.Errorf("%s has xds without the controller: %v", name, cfg["xds"])
		}
	}
}

func TestChartController_Enabled(t *testing.T) {
	objs := render(t, "--set", "controller.enabled=true,agentNamespaces={agents}")
	t.Logf("controller objects: %s", kinds(controllerObjects(objs)))

	var d deployment
	named(t, objs, "Deployment", controllerName).into(t, &d)
	ps := d.Spec.Template.Spec

	t.Run("deployment_runs_escrow_controller_with_2_replicas_spread_over_nodes", func(t *testing.T) {
		if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
			t.Errorf("replicas = %v, want 2", d.Spec.Replicas)
		}
		if !d.Spec.Selector.matches(d.Spec.Template.Metadata.Labels) {
			t.Errorf("selector %+v does not match the template's labels", d.Spec.Selector)
		}
		var webhook deployment
		named(t, objs, "Deployment", "escrow-webhook").into(t, &webhook)
		if d.Spec.Selector.matches(webhook.Spec.Template.Metadata.Labels) {
			t.Errorf("the controller's selector also selects the webhook's pods")
		}
		if d.Spec.Template.Metadata.Labels["escrow.dev/inject"] != "false" {
			t.Errorf("the controller's pods must be labelled escrow.dev/inject=false")
		}
		if len(ps.Containers) != 1 {
			t.Fatalf("containers = %d", len(ps.Containers))
		}
		c := ps.Containers[0]
		if want := []string{"controller", "--listen=:15490", "--admin=:15491", "--log-level=info"}; !reflect.DeepEqual(c.Args, want) {
			t.Errorf("args = %q, want %q", c.Args, want)
		}
		if want := "escrowproxy/escrow:" + chartAppVersion(t); c.Image != want {
			t.Errorf("image = %q, want %q", c.Image, want)
		}
		if ps.Affinity == nil || ps.Affinity.PodAntiAffinity["preferredDuringSchedulingIgnoredDuringExecution"] == nil {
			t.Errorf("no preferred pod anti-affinity: %+v", ps.Affinity)
		}
		raw := rawTemplateSpec(t, objs, "Deployment/"+controllerName).(map[string]any)
		spread, _ := raw["topologySpreadConstraints"].([]any)
		if len(spread) != 1 || spread[0].(map[string]any)["topologyKey"] != "topology.kubernetes.io/zone" {
			t.Errorf("topologySpreadConstraints = %v, want one over zones", raw["topologySpreadConstraints"])
		}
		if ps.ServiceAccountName != controllerName || ps.AutomountServiceAccountToken == nil || !*ps.AutomountServiceAccountToken {
			t.Errorf("serviceAccountName = %q automount = %v: the controller reads the API with its ServiceAccount's token",
				ps.ServiceAccountName, ps.AutomountServiceAccountToken)
		}
	})

	t.Run("pod_is_restricted", func(t *testing.T) {
		checkRestricted(t, "Deployment/"+controllerName, ps)
	})

	t.Run("pod_namespace_from_the_downward_api_and_the_workload_api_socket_as_the_sidecars_get_it", func(t *testing.T) {
		raw := rawTemplateSpec(t, objs, "Deployment/"+controllerName).(map[string]any)
		ctr := raw["containers"].([]any)[0].(map[string]any)
		env := map[string]any{}
		for _, e := range ctr["env"].([]any) {
			env[e.(map[string]any)["name"].(string)] = e
		}
		ref, _ := yaml.Marshal(env["POD_NAMESPACE"])
		if !strings.Contains(string(ref), "fieldPath: metadata.namespace") {
			t.Errorf("POD_NAMESPACE = %s, want the downward API's metadata.namespace", ref)
		}
		sock, _ := env["SPIFFE_ENDPOINT_SOCKET"].(map[string]any)
		if sock["value"] != "unix:///spiffe-workload-api/spire-agent.sock" {
			t.Errorf("SPIFFE_ENDPOINT_SOCKET = %v", sock)
		}
		var inj struct {
			SPIFFE struct {
				CSIDriver string `json:"csi_driver"`
			} `json:"spiffe"`
		}
		if err := yaml.Unmarshal([]byte(injectorConfig(t, objs)), &inj); err != nil {
			t.Fatal(err)
		}
		vol := volumeMountedAt(t, ps, "controller", "/spiffe-workload-api")
		csi, _ := vol["csi"].(map[string]any)
		if csi["driver"] != inj.SPIFFE.CSIDriver || csi["readOnly"] != true {
			t.Errorf("Workload API volume = %v, want the CSI driver %q read-only, as the injector mounts it", vol, inj.SPIFFE.CSIDriver)
		}

		hp := render(t, "--set", "controller.enabled=true,sidecar.spiffe.source=hostPath,sidecar.spiffe.hostPath=/run/spire/sockets")
		var hd deployment
		named(t, hp, "Deployment", controllerName).into(t, &hd)
		vol = volumeMountedAt(t, hd.Spec.Template.Spec, "controller", "/spiffe-workload-api")
		if h, _ := vol["hostPath"].(map[string]any); h["path"] != "/run/spire/sockets" {
			t.Errorf("hostPath source: volume = %v", vol)
		}
	})

	t.Run("probes_on_the_admin_port", func(t *testing.T) {
		raw := rawTemplateSpec(t, objs, "Deployment/"+controllerName).(map[string]any)
		ctr := raw["containers"].([]any)[0].(map[string]any)
		ports := map[string]float64{}
		for _, p := range ctr["ports"].([]any) {
			pm := p.(map[string]any)
			ports[pm["name"].(string)] = pm["containerPort"].(float64)
		}
		if ports["grpc"] != 15490 || ports["admin"] != 15491 {
			t.Errorf("ports = %v", ports)
		}
		for probe, path := range map[string]string{"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"} {
			pr, _ := ctr[probe].(map[string]any)
			get, _ := pr["httpGet"].(map[string]any)
			if get["path"] != path || get["port"] != "admin" {
				t.Errorf("%s = %v, want GET %s on the admin port", probe, pr, path)
			}
		}
	})

	t.Run("service_exposes_grpc_and_selects_the_controller_pods", func(t *testing.T) {
		var svc struct {
			Spec struct {
				Selector map[string]string `json:"selector"`
				Ports    []struct {
					Name       string `json:"name"`
					Port       int    `json:"port"`
					TargetPort any    `json:"targetPort"`
				} `json:"ports"`
			} `json:"spec"`
		}
		named(t, objs, "Service", controllerName).into(t, &svc)
		if len(svc.Spec.Ports) == 0 || svc.Spec.Ports[0].Name != "grpc" || svc.Spec.Ports[0].Port != 15490 || svc.Spec.Ports[0].TargetPort != "grpc" {
			t.Errorf("ports = %+v, want grpc 15490", svc.Spec.Ports)
		}
		if !(labelSelector{MatchLabels: svc.Spec.Selector}).matches(d.Spec.Template.Metadata.Labels) {
			t.Errorf("the Service does not select the controller's pods")
		}
	})

	t.Run("rbac_reads_the_four_kinds_and_updates_policy_status_only", func(t *testing.T) {
		var cr clusterRole
		named(t, objs, "ClusterRole", controllerName).into(t, &cr)
		if got := cr.grants(); !reflect.DeepEqual(got, wantControllerGrants) {
			t.Errorf("ClusterRole grants\n%q\nwant exactly\n%q", got, wantControllerGrants)
		}
		var crb struct {
			RoleRef  map[string]string   `json:"roleRef"`
			Subjects []map[string]string `json:"subjects"`
		}
		named(t, objs, "ClusterRoleBinding", controllerName).into(t, &crb)
		if crb.RoleRef["kind"] != "ClusterRole" || crb.RoleRef["name"] != controllerName {
			t.Errorf("roleRef = %v", crb.RoleRef)
		}
		if len(crb.Subjects) != 1 || crb.Subjects[0]["kind"] != "ServiceAccount" || crb.Subjects[0]["name"] != controllerName ||
			crb.Subjects[0]["namespace"] != releaseNS {
			t.Errorf("subjects = %v, want the controller's ServiceAccount only", crb.Subjects)
		}
		named(t, objs, "ServiceAccount", controllerName)
		// One namespaced Role: get on the Secrets of brokered Credentials, in escrow's own
		// namespace only.
		if f := find(objs, "Role"); len(f) != 1 || f[0].Metadata.Name != controllerName || f[0].Metadata.Namespace != releaseNS {
			t.Fatalf("Roles: %s, want %s in %s only", kinds(f), controllerName, releaseNS)
		}
		var role clusterRole
		named(t, objs, "Role", controllerName).into(t, &role)
		if got := role.grants(); !reflect.DeepEqual(got, []string{"/secrets:get"}) {
			t.Errorf("Role grants %q, want exactly get on secrets", got)
		}
		var rb struct {
			RoleRef  map[string]string   `json:"roleRef"`
			Subjects []map[string]string `json:"subjects"`
		}
		named(t, objs, "RoleBinding", controllerName).into(t, &rb)
		if rb.RoleRef["kind"] != "Role" || rb.RoleRef["name"] != controllerName || len(rb.Subjects) != 1 ||
			rb.Subjects[0]["name"] != controllerName || rb.Subjects[0]["namespace"] != releaseNS {
			t.Errorf("RoleBinding = %+v", rb)
		}
	})

	t.Run("pdb_with_more_than_one_replica", func(t *testing.T) {
		var pdb struct {
			Spec struct {
				MinAvailable any           `json:"minAvailable"`
				Selector     labelSelector `json:"selector"`
			} `json:"spec"`
		}
		named(t, objs, "PodDisruptionBudget", controllerName).into(t, &pdb)
		if pdb.Spec.MinAvailable != float64(1) || !pdb.Spec.Selector.matches(d.Spec.Template.Metadata.Labels) {
			t.Errorf("PDB minAvailable = %v, selects controller pods = %v", pdb.Spec.MinAvailable, pdb.Spec.Selector.matches(d.Spec.Template.Metadata.Labels))
		}
		one := render(t, "--set", "controller.enabled=true,controller.replicas=1")
		for _, p := range find(one, "PodDisruptionBudget") {
			if p.Metadata.Name == controllerName {
				t.Errorf("a PDB with minAvailable 1 over 1 replica would block every node drain")
			}
		}
	})

	t.Run("sidecar_configs_point_at_the_controller_service_in_every_namespace", func(t *testing.T) {
		for _, ns := range []string{releaseNS, "agents"} {
			for _, name := range []string{"escrow-config", "escrow-config-process"} {
				cfg := configYAML(t, objs, ns, name)
				xds, _ := cfg["xds"].(map[string]any)
				if xds["address"] != controllerAddr {
					t.Errorf("%s/%s xds = %v, want address %s", ns, name, cfg["xds"], controllerAddr)
				}
				if _, ok := xds["server_id"]; ok {
					t.Errorf("%s/%s: server_id set although controller.spiffeID is empty: %v", ns, name, xds)
				}
			}
		}
		id := "spiffe://example.org/ns/escrow-system/sa/escrow-controller"
		withID := render(t, "--set", "controller.enabled=true,controller.spiffeID="+id)
		if xds, _ := configYAML(t, withID, releaseNS, "escrow-config")["xds"].(map[string]any); xds["server_id"] != id {
			t.Errorf("xds = %v, want server_id %s", xds, id)
		}
		// A key of config.xds the operator set wins over the chart's.
		own := render(t, "--set", "controller.enabled=true,config.xds.max_backoff=5s,config.xds.address=cp.example:443")
		if xds, _ := configYAML(t, own, releaseNS, "escrow-config")["xds"].(map[string]any); xds["address"] != "cp.example:443" || xds["max_backoff"] != "5s" {
			t.Errorf("xds = %v, want the operator's address and max_backoff", xds)
		}
	})

	t.Run("service_monitor_for_the_controller_when_monitoring_is_on", func(t *testing.T) {
		m := render(t, "--set", "controller.enabled=true,metrics.serviceMonitor.enabled=true")
		var sm struct {
			Spec struct {
				Selector  labelSelector `json:"selector"`
				Endpoints []struct {
					Port string `json:"port"`
					Path string `json:"path"`
				} `json:"endpoints"`
			} `json:"spec"`
		}
		named(t, m, "ServiceMonitor", controllerName).into(t, &sm)
		svc := named(t, m, "Service", controllerName)
		if !sm.Spec.Selector.matches(svc.Metadata.Labels) {
			t.Errorf("the ServiceMonitor does not select the controller's Service")
		}
		if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "admin" || sm.Spec.Endpoints[0].Path != "/metrics" {
			t.Errorf("endpoints = %+v", sm.Spec.Endpoints)
		}
		if len(find(m, "ServiceMonitor")) != 2 {
			t.Errorf("want the webhook's and the controller's ServiceMonitors: %s", kinds(find(m, "ServiceMonitor")))
		}
	})

	t.Run("no_xds_without_a_spiffe_identity", func(t *testing.T) {
		// null removes the chart's default identity.spiffe (helm's way to delete a default key).
		f := filepath.Join(t.TempDir(), "static.yaml")
		if err := os.WriteFile(f, []byte("controller: {enabled: true}\nconfig:\n  identity: {spiffe: null, static: \"spiffe://example.org/agent\"}\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := helmTemplate(t, "-f", f)
		if err == nil || !strings.Contains(err.Error(), "config.identity.spiffe") {
			t.Errorf("controller with a static identity: %v, want a render error naming config.identity.spiffe", err)
		}
	})
}

// volumeMountedAt returns the pod volume that container mounts at path.
func volumeMountedAt(t *testing.T, ps podSpec, container, path string) map[string]any {
	t.Helper()
	for _, c := range ps.Containers {
		if c.Name != container {
			continue
		}
		for _, m := range c.VolumeMounts {
			if m["mountPath"] != path {
				continue
			}
			if m["readOnly"] != true {
				t.Errorf("%s mounts %s read-write", container, path)
			}
			for _, v := range ps.Volumes {
				if v["name"] == m["name"] {
					return v
				}
			}
		}
	}
	t.Fatalf("%s mounts nothing at %s", container, path)
	return nil
}

// checkControllerOnAPIServer: the controller's objects, installed by helm into a real API
// server, are accepted; its ServiceAccount may do exactly what the controller needs; and the real
// `escrow controller`, started with the Deployment's args as that ServiceAccount, gets ready,
// writes a Policy's status, and serves a real `escrow proxy` running the chart's sidecar config,
// which follows a Policy object.
func checkControllerOnAPIServer(t *testing.T, c *cluster) {
	work := t.TempDir()
	if err := os.Symlink(filepath.Join(repoRoot, "charts"), filepath.Join(work, "charts")); err != nil {
		t.Fatal(err)
	}
	if out, err := c.shell(t, work, "helm upgrade escrow ./charts/escrow --namespace escrow-system --reuse-values --set controller.enabled=true"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, o := range []string{"deployment/" + controllerName, "service/" + controllerName, "serviceaccount/" + controllerName,
		"poddisruptionbudget/" + controllerName} {
		c.kubectl(t, nil, "get", "-n", releaseNS, o)
	}
	c.kubectl(t, nil, "get", "clusterrole/"+controllerName, "clusterrolebinding/"+controllerName)
	for _, crd := range []string{"policies", "upstreams", "credentials", "revocations"} {
		c.kubectl(t, nil, "get", "crd", crd+".escrow.dev")
	}
	// The sidecar config the injected pods mount now follows the controller.
	cm := c.kubectl(t, nil, "get", "configmap", "-n", "agents", "escrow-config", "-o", "jsonpath={.data.config\\.yaml}")
	if !strings.Contains(cm, "address: "+controllerAddr) {
		t.Errorf("escrow-config in agents after the upgrade has no xds address %s:\n%s", controllerAddr, cm)
	}

	t.Run("controller_pod_passes_restricted_pod_security", func(t *testing.T) {
		c.kubectl(t, nil, "label", "--overwrite", "namespace", releaseNS, "pod-security.kubernetes.io/enforce=restricted")
		objs := render(t, "--set", "controller.enabled=true")
		var d deployment
		named(t, objs, "Deployment", controllerName).into(t, &d)
		p := map[string]any{"apiVersion": "v1", "kind": "Pod",
			"metadata": map[string]any{"name": "controller-from-template", "namespace": releaseNS, "labels": d.Spec.Template.Metadata.Labels},
			"spec":     rawTemplateSpec(t, objs, "Deployment/"+controllerName)}
		b, _ := yaml.Marshal(p)
		if _, err := c.kubectlErr(b, "create", "-f", "-"); err != nil {
			t.Errorf("the controller's pod template refused in a restricted namespace: %v", err)
		}
	})

	t.Run("service_account_may_do_exactly_what_the_controller_needs", func(t *testing.T) {
		cases := []struct {
			args []string
			want bool
		}{
			{[]string{"list", "policies.escrow.dev", "-n", "agents"}, true},
			{[]string{"watch", "policies.escrow.dev", "--all-namespaces"}, true},
			{[]string{"get", "upstreams.escrow.dev", "-n", releaseNS}, true},
			{[]string{"list", "credentials.escrow.dev", "--all-namespaces"}, true},
			{[]string{"watch", "revocations.escrow.dev", "-n", "agents"}, true},
			{[]string{"update", "policies.escrow.dev", "--subresource=status", "-n", "agents"}, true},
			{[]string{"patch", "policies.escrow.dev", "--subresource=status", "-n", "agents"}, false},
			{[]string{"update", "policies.escrow.dev", "-n", "agents"}, false},
			{[]string{"create", "revocations.escrow.dev", "-n", "agents"}, false},
			{[]string{"delete", "policies.escrow.dev", "-n", "agents"}, false},
			{[]string{"update", "upstreams.escrow.dev", "--subresource=status", "-n", "agents"}, true},
			{[]string{"update", "credentials.escrow.dev", "--subresource=status", "-n", releaseNS}, true},
			{[]string{"update", "revocations.escrow.dev", "--subresource=status", "-n", "agents"}, true},
			{[]string{"patch", "upstreams.escrow.dev", "--subresource=status", "-n", "agents"}, false},
			{[]string{"update", "credentials.escrow.dev", "-n", "agents"}, false},
			{[]string{"get", "secrets", "-n", "agents"}, false},
			{[]string{"list", "secrets", "-n", releaseNS}, false},
			{[]string{"list", "pods", "--all-namespaces"}, false},
			{[]string{"get", "configmaps", "-n", releaseNS}, false},
		}
		for _, tc := range cases {
			out, err := c.kubectlErr(nil, append([]string{"auth", "can-i", "--as", controllerSA}, tc.args...)...)
			got := strings.TrimSpace(out) == "yes"
			if err != nil && got {
				t.Fatalf("can-i %v: %v", tc.args, err)
			}
			if got != tc.want {
				t.Errorf("can-i --as %s %v = %q, want %v", controllerSA, tc.args, strings.TrimSpace(out), tc.want)
			}
		}
	})

	t.Run("escrow_controller_as_the_service_account_serves_a_sidecar_with_the_chart_config_and_writes_policy_status", func(t *testing.T) {
		checkControllerRuns(t, c)
	})

	t.Run("disabling_removes_the_controller", func(t *testing.T) {
		if out, err := c.shell(t, work, "helm upgrade escrow ./charts/escrow --namespace escrow-system --reuse-values --set controller.enabled=false"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if _, err := c.kubectlErr(nil, "get", "clusterrole", controllerName); err == nil {
			t.Errorf("ClusterRole %s left behind after controller.enabled=false", controllerName)
		}
		cm := c.kubectl(t, nil, "get", "configmap", "-n", "agents", "escrow-config", "-o", "jsonpath={.data.config\\.yaml}")
		if strings.Contains(cm, "xds") {
			t.Errorf("escrow-config still has xds after the controller was disabled:\n%s", cm)
		}
	})
}

// controllerRun is a real `escrow controller` started with the chart Deployment's args (the
// addresses on loopback) and an X509-SVID from files instead of the Workload API; wl is the
// Workload API of the same trust domain that gives the sidecars theirs.
type controllerRun struct {
	proc        *process
	id          string // the controller's SPIFFE ID
	grpc, admin string // loopback addresses of its --listen and --admin
	wl          *attesttest.WorkloadAPI
	objs        []object // the chart rendered with the controller enabled for namespace agents
}

// startController starts the controller with kubeconfig and waits for its /readyz.
func startController(t *testing.T, kubeconfig string) *controllerRun {
	t.Helper()
	r := &controllerRun{id: "spiffe://example.org/ns/" + releaseNS + "/sa/" + controllerName}
	r.objs = render(t, "--set", "controller.enabled=true,agentNamespaces={agents},controller.spiffeID="+r.id)
	var d deployment
	named(t, r.objs, "Deployment", controllerName).into(t, &d)
	dir := t.TempDir()

	// One trust domain: the sidecars' SVIDs from the Workload API, the controller's from files.
	r.wl = attesttest.NewWorkloadAPI(t, "example.org")
	own := r.wl.MintX509SVID(r.id, time.Now().Add(time.Hour))
	certPEM, keyPEM, err := own.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	var bundlePEM []byte
	for _, a := range r.wl.X509Authorities() {
		bundlePEM = append(bundlePEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.Raw})...)
	}
	certFile, keyFile, bundleFile := filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid.key"), filepath.Join(dir, "bundle.pem")
	for f, b := range map[string][]byte{certFile: certPEM, keyFile: keyPEM, bundleFile: bundlePEM} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}

	r.grpc, r.admin = fmt.Sprintf("127.0.0.1:%d", freePort(t)), fmt.Sprintf("127.0.0.1:%d", freePort(t))
	var args []string
	for _, a := range d.Spec.Template.Spec.Containers[0].Args {
		switch {
		case strings.HasPrefix(a, "--listen="):
			a = "--listen=" + r.grpc
		case strings.HasPrefix(a, "--admin="):
			a = "--admin=" + r.admin
		}
		args = append(args, a)
	}
	args = append(args, "--kubeconfig", kubeconfig, "--svid-cert", certFile, "--svid-key", keyFile, "--bundle", bundleFile)
	// POD_NAMESPACE as the downward API gives it to the pod in the release namespace.
	t.Setenv("POD_NAMESPACE", releaseNS)
	r.proc = start(t, escrow(t), args...)
	waitOK(t, r.proc, "http://"+r.admin+"/readyz", "escrow controller /readyz")
	return r
}

// bundle is the trust bundle the controller and its sidecars share.
func (r *controllerRun) bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(r.wl.TrustDomain(), r.wl.X509Authorities())
}

// dial opens a raw ADS stream as sidecarID claiming nodeID.
func (r *controllerRun) dial(t *testing.T, sidecarID, nodeID string) *controllertest.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	cl, err := controllertest.Dial(ctx, r.grpc, controllertest.ClientTLS(r.wl.MintX509SVID(sidecarID, time.Now().Add(time.Hour)), r.bundle()), nodeID)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// startSidecar starts a real `escrow proxy` with the sidecar config the chart renders for
// namespace agents (xds.address moved to loopback, server_id as rendered) and the SVID of
// spiffe://example.org/ns/agents/sa/default from the Workload API, and waits for its /readyz
// (the controller's first bundle applied). It returns the sidecar's admin address.
func (r *controllerRun) startSidecar(t *testing.T) string {
	t.Helper()
	r.wl.SetSVID("spiffe://example.org/ns/agents/sa/default", time.Now().Add(time.Hour))
	dir := t.TempDir()
	cfg := configYAML(t, r.objs, "agents", "escrow-config")
	xds := cfg["xds"].(map[string]any)
	if xds["server_id"] != r.id {
		t.Fatalf("xds = %v, want server_id %s", xds, r.id)
	}
	xds["address"] = r.grpc
	pdir := filepath.Join(dir, "policies")
	if err := os.Mkdir(pdir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, cm := range find(r.objs, "ConfigMap") {
		if cm.Metadata.Namespace == "agents" && cm.Metadata.Name == "escrow-policies" {
			var p struct {
				Data map[string]string `json:"data"`
			}
			cm.into(t, &p)
			for k, v := range p.Data {
				if err := os.WriteFile(filepath.Join(pdir, k), []byte(v), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg["policy"].(map[string]any)["dir"] = pdir
	cfg["ca_dir"], cfg["ca_key_dir"] = filepath.Join(dir, "ca"), filepath.Join(dir, "ca-key")
	cfg["listen"], cfg["admin"] = fmt.Sprintf("127.0.0.1:%d", freePort(t)), admin
	b, _ := yaml.Marshal(cfg)
	cfgFile := filepath.Join(dir, "sidecar.yaml")
	if err := os.WriteFile(cfgFile, b, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SPIFFE_ENDPOINT_SOCKET", r.wl.Addr())
	sidecar := start(t, escrow(t), "proxy", "--config", cfgFile)
	waitOK(t, sidecar, "http://"+admin+"/readyz", "escrow proxy /readyz (the controller's first bundle applied)")
	return admin
}

// checkControllerRuns starts the real `escrow controller` as the controller's ServiceAccount
// (impersonated); then a real `escrow proxy` with the sidecar config the chart renders for
// namespace agents subscribes to it, and follows a Policy object.
func checkControllerRuns(t *testing.T, c *cluster) {
	// A kubeconfig that acts as the controller's ServiceAccount.
	kc, err := os.ReadFile(c.kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	asSA := strings.Replace(string(kc), "  user: {token:", "  user: {as: \""+controllerSA+"\", token:", 1)
	if asSA == string(kc) {
		t.Fatal("could not add impersonation to the test kubeconfig")
	}
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(asSA), 0o600); err != nil {
		t.Fatal(err)
	}
	ctl := startController(t, kubeconfig)

	// A raw ADS client of namespace agents receives its bundle.
	sidecarID := "spiffe://example.org/ns/agents/sa/default"
	cl := ctl.dial(t, sidecarID, sidecarID)
	if resp, _, err := cl.Recv(); err != nil || resp.GetVersionInfo() == "" {
		t.Fatalf("no bundle for the agents sidecar: %v %v", resp, err)
	}

	// An invalid Policy gets Accepted=False: the controller may update policies/status.
	applyInvalidPolicy(t, c)

	// The real sidecar, with the config the chart puts in namespace agents.
	sidecarAdmin := ctl.startSidecar(t)
	applied := func() (string, error) {
		res, err := http.Get("http://" + sidecarAdmin + "/metrics")
		if err != nil {
			return "", err
		}
		defer res.Body.Close()
		body, _ := io.ReadAll(res.Body)
		m := regexp.MustCompile(`escrow_xds_applied_info\{version="([^"]+)"\} 1`).FindSubmatch(body)
		if m == nil {
			return "", fmt.Errorf("no escrow_xds_applied_info in /metrics")
		}
		return string(m[1]), nil
	}
	before, err := applied()
	if err != nil {
		t.Fatal(err)
	}
	// A valid Policy in the sidecar's namespace reaches it: a new version is applied.
	c.kubectl(t, []byte(`apiVersion: escrow.dev/v1alpha1
kind: Policy
metadata: {name: chart-test, namespace: agents}
spec:
  cedar: |
    @id("chart-test-get")
    permit(principal, action == Action::"GET", resource == Host::"api.example.com");
`), "apply", "-f", "-")
	eventually(t, 15*time.Second, "the sidecar applies the bundle with the new Policy", func() error {
		v, err := applied()
		if err != nil {
			return err
		}
		if v == before {
			return fmt.Errorf("still version %s", v)
		}
		t.Logf("the sidecar applied version %s, then %s after the Policy was created", before, v)
		return nil
	})
	if out := ctl.proc.output(); strings.Contains(out, "forbidden") {
		t.Errorf("the controller was refused something by RBAC:\n%s", tail(out, 4096))
	}
}

// applyInvalidPolicy creates a Policy in namespace agents whose Cedar does not validate, and
// waits until the controller wrote its status Accepted=False.
func applyInvalidPolicy(t *testing.T, c *cluster) {
	t.Helper()
	c.kubectl(t, []byte(`apiVersion: escrow.dev/v1alpha1
kind: Policy
metadata: {name: typo, namespace: agents}
spec:
  cedar: |
    @id("typo")
    permit(principal, action, resource) when { context.methd == "GET" };
`), "apply", "-f", "-")
	eventually(t, 15*time.Second, "the controller writes the invalid Policy's status", func() error {
		st, err := c.kubectlErr(nil, "get", "policy", "-n", "agents", "typo", "-o", "jsonpath={.status.conditions[?(@.type==\"Accepted\")].status}")
		if err != nil {
			return err
		}
		if strings.TrimSpace(st) != "False" {
			return fmt.Errorf("Accepted = %q", st)
		}
		return nil
	})
}

// waitOK polls url until it answers 200, failing if proc exits first.
func waitOK(t *testing.T, proc *process, url, what string) {
	t.Helper()
	eventually(t, 30*time.Second, what, func() error {
		if proc.exited() {
			t.Fatalf("%s: the process exited:\n%s", what, proc.output())
		}
		res, err := http.Get(url)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != 200 {
			return fmt.Errorf("status %d: %s", res.StatusCode, body)
		}
		return nil
	})
}
