package injector

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
)

// writeTestCert writes a self-signed certificate for 127.0.0.1 and its key to dir and returns
// the file paths and the certificate.
func writeTestCert(t testing.TB, dir, cn string) (certFile, keyFile string, cert *x509.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	// Replace atomically, as the kubelet does for a mounted Secret.
	for _, f := range []struct {
		path string
		data []byte
	}{
		{keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})},
		{certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})},
	} {
		tmp := f.path + ".tmp"
		if err := os.WriteFile(tmp, f.data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, f.path); err != nil {
			t.Fatal(err)
		}
	}
	cert, _ = x509.ParseCertificate(der)
	return certFile, keyFile, cert
}

type testServer struct {
	srv    *Server
	url    string
	client *http.Client
	cancel context.CancelFunc
	done   chan struct{} // closed when Serve has returned serveErr
	dir    string

	serveErr error
}

func startServer(t *testing.T, o ServerOptions) *testServer {
	t.Helper()
	dir := t.TempDir()
	certFile, keyFile, cert := writeTestCert(t, dir, "first")
	o.Addr, o.CertFile, o.KeyFile = "127.0.0.1:0", certFile, keyFile
	if o.Injector == nil {
		o.Injector = testInjector(t, "testdata/config.yaml")
	}
	srv, err := NewServer(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	ts := &testServer{
		srv: srv, url: "https://" + srv.Addr().String(), cancel: cancel, done: done, dir: dir,
		client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}},
	}
	go func() { ts.serveErr = srv.Serve(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return")
		}
	})
	return ts
}

func (ts *testServer) post(t *testing.T, body []byte, contentType string) (int, []byte) {
	t.Helper()
	resp, err := ts.client.Post(ts.url+"/mutate", contentType, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

func review(t testing.TB, op admissionv1.Operation, ns string, resource metav1.GroupVersionResource, kind string, obj any) []byte {
	t.Helper()
	raw, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	ar := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID:       types.UID("d2b7f9a4-0000-4000-8000-000000000001"),
			Kind:      metav1.GroupVersionKind{Version: "v1", Kind: kind},
			Resource:  resource,
			Namespace: ns,
			Operation: op,
			Object:    runtime.RawExtension{Raw: raw},
		},
	}
	b, err := json.Marshal(ar)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func agentPod() *corev1.Pod {
	return &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{GenerateName: "coder-", Namespace: "agents"},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "agent", Image: "agent:1"}}},
	}
}

func decodeReview(t *testing.T, b []byte) *admissionv1.AdmissionResponse {
	t.Helper()
	var ar admissionv1.AdmissionReview
	if err := json.Unmarshal(b, &ar); err != nil {
		t.Fatalf("response is not an AdmissionReview: %v\n%s", err, b)
	}
	if ar.APIVersion != "admission.k8s.io/v1" || ar.Kind != "AdmissionReview" || ar.Response == nil {
		t.Fatalf("bad response review: %s", b)
	}
	if ar.Response.UID != "d2b7f9a4-0000-4000-8000-000000000001" {
		t.Fatalf("response uid = %q, want the request's", ar.Response.UID)
	}
	return ar.Response
}

func TestServer_MutateOverTLS(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	pod := agentPod()
	code, body := ts.post(t, review(t, admissionv1.Create, "agents", podResource, "Pod", pod), "application/json")
	if code != http.StatusOK {
		t.Fatalf("status %d: %s", code, body)
	}
	resp := decodeReview(t, body)
	if !resp.Allowed || resp.PatchType == nil || *resp.PatchType != admissionv1.PatchTypeJSONPatch || len(resp.Patch) == 0 {
		t.Fatalf("response = %+v", resp)
	}
	orig, _ := json.Marshal(pod)
	var out corev1.Pod
	if err := json.Unmarshal(applyPatch(t, orig, resp.Patch), &out); err != nil {
		t.Fatal(err)
	}
	if len(out.Spec.InitContainers) != 1 || out.Spec.InitContainers[0].Name != ContainerName {
		t.Fatalf("patched pod has no escrow sidecar: %+v", out.Spec.InitContainers)
	}
	if env(out.Spec.Containers[0])["HTTPS_PROXY"] != "http://127.0.0.1:15480" {
		t.Fatal("patched agent container has no HTTPS_PROXY")
	}

	// The decision is counted.
	metrics := ts.get(t, "/metrics")
	for _, want := range []string{
		`escrow_injector_requests_total{result="injected"} 1`,
		`escrow_injector_requests_total{result="error"} 0`,
		`escrow_injector_request_duration_seconds_count 1`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if got := ts.get(t, "/healthz"); got != "ok\n" {
		t.Errorf("/healthz = %q", got)
	}
	if got := ts.get(t, "/readyz"); got != "ok\n" {
		t.Errorf("/readyz = %q", got)
	}
}

func (ts *testServer) get(t *testing.T, path string) string {
	t.Helper()
	resp, err := ts.client.Get(ts.url + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, resp.StatusCode, b)
	}
	return string(b)
}

func TestServer_Answers(t *testing.T) {
	ts := startServer(t, ServerOptions{MaxBodyBytes: 1 << 20})
	pod := agentPod()
	valid := review(t, admissionv1.Create, "agents", podResource, "Pod", pod)
	var missingRequest, wrongKind, wrongVersion, noUID map[string]any
	for _, m := range []*map[string]any{&missingRequest, &wrongKind, &wrongVersion, &noUID} {
		if err := json.Unmarshal(valid, m); err != nil {
			t.Fatal(err)
		}
	}
	delete(missingRequest, "request")
	wrongKind["kind"] = "Pod"
	wrongVersion["apiVersion"] = "admission.k8s.io/v1beta1"
	delete(noUID["request"].(map[string]any), "uid")
	enc := func(m map[string]any) []byte { b, _ := json.Marshal(m); return b }

	for _, tc := range []struct {
		name, contentType string
		body              []byte
		code              int
		msg               string
	}{
		{"not JSON", "application/json", []byte("<xml/>"), 400, "not an AdmissionReview"},
		{"empty body", "application/json", nil, 400, "not an AdmissionReview"},
		{"trailing data", "application/json", append(append([]byte{}, valid...), []byte(" {}")...), 400, "trailing data"},
		{"wrong kind", "application/json", enc(wrongKind), 400, `kind "Pod"`},
		{"wrong apiVersion", "application/json", enc(wrongVersion), 400, `apiVersion "admission.k8s.io/v1beta1"`},
		{"missing request", "application/json", enc(missingRequest), 400, "no request"},
		{"missing uid", "application/json", enc(noUID), 400, "no uid"},
		{"wrong content type", "text/plain", valid, 415, "Content-Type"},
		{"huge body", "application/json", bytes.Repeat([]byte(" "), 2<<20), 413, "body over"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, body := ts.post(t, tc.body, tc.contentType)
			if code != tc.code || !strings.Contains(string(body), tc.msg) {
				t.Errorf("got %d %q, want %d containing %q", code, body, tc.code, tc.msg)
			}
		})
	}

	t.Run("GET", func(t *testing.T) {
		resp, err := ts.client.Get(ts.url + "/mutate")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("status %d, want 405", resp.StatusCode)
		}
	})

	// Reviews the webhook should not have been sent are allowed unchanged, with a warning.
	for _, tc := range []struct {
		name string
		body []byte
	}{
		{"a ConfigMap", review(t, admissionv1.Create, "agents", metav1.GroupVersionResource{Version: "v1", Resource: "configmaps"}, "ConfigMap", &corev1.ConfigMap{})},
		{"a pod UPDATE", review(t, admissionv1.Update, "agents", podResource, "Pod", pod)},
		{"a pod subresource", func() []byte {
			var m map[string]any
			_ = json.Unmarshal(valid, &m)
			m["request"].(map[string]any)["subResource"] = "ephemeralcontainers"
			return enc(m)
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, body := ts.post(t, tc.body, "application/json")
			if code != 200 {
				t.Fatalf("status %d: %s", code, body)
			}
			resp := decodeReview(t, body)
			if !resp.Allowed || resp.Patch != nil || len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], "escrow injector: ignored") {
				t.Errorf("response = %+v", resp)
			}
		})
	}

	// A pod the webhook refuses: allowed false with the reason, in an AdmissionReview.
	for _, tc := range []struct {
		name string
		raw  []byte
		msg  string
	}{
		{"bad annotation", review(t, admissionv1.Create, "agents", podResource, "Pod", &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{AnnotationTrustEnv: "maybe"}}}), "escrow.dev/trust-env"},
		{"object not a pod", func() []byte {
			var m map[string]any
			_ = json.Unmarshal(valid, &m)
			m["request"].(map[string]any)["object"] = map[string]any{"spec": "nope"}
			return enc(m)
		}(), "decode pod"},
		{"no object", func() []byte {
			var m map[string]any
			_ = json.Unmarshal(valid, &m)
			delete(m["request"].(map[string]any), "object")
			return enc(m)
		}(), "no object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, body := ts.post(t, tc.raw, "application/json")
			if code != 200 {
				t.Fatalf("status %d: %s", code, body)
			}
			resp := decodeReview(t, body)
			if resp.Allowed || resp.Result == nil || resp.Result.Code != 400 || !strings.Contains(resp.Result.Message, tc.msg) {
				t.Errorf("response = %+v, want a 400 denial naming %q", resp, tc.msg)
			}
			// kubectl shows this text: one prefix, not "escrow injector: injector: ...".
			if resp.Result != nil && (!strings.HasPrefix(resp.Result.Message, "escrow injector: ") || strings.Contains(resp.Result.Message, "injector: injector:")) {
				t.Errorf("message %q: want exactly one \"escrow injector: \" prefix", resp.Result.Message)
			}
		})
	}

	metrics := ts.get(t, "/metrics")
	for _, want := range []string{
		`escrow_injector_requests_total{result="error"} 12`,
		`escrow_injector_requests_total{result="skipped"} 3`,
		`escrow_injector_requests_total{result="denied"} 1`,
		`escrow_injector_requests_total{result="injected"} 0`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, grep(metrics, "escrow_injector_requests_total"))
		}
	}
}

func grep(s, sub string) string {
	var out []string
	for l := range strings.SplitSeq(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func servedCert(t *testing.T, addr string) *x509.Certificate {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0]
}

func TestServer_CertificateRotation(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	addr := ts.srv.Addr().String()
	if cn := servedCert(t, addr).Subject.CommonName; cn != "first" {
		t.Fatalf("serving %q, want first", cn)
	}
	_, _, second := writeTestCert(t, ts.dir, "second")
	if got := servedCert(t, addr); !got.Equal(second) {
		t.Fatalf("after rotation serving %q, want second", got.Subject.CommonName)
	}

	// A half-written rotation (a key that does not match) keeps the last good certificate.
	if err := os.WriteFile(filepath.Join(ts.dir, "tls.key"), []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := servedCert(t, addr); !got.Equal(second) {
		t.Fatalf("with a broken key serving %q, want the last good (second)", got.Subject.CommonName)
	}
	_, _, third := writeTestCert(t, ts.dir, "third")
	if got := servedCert(t, addr); !got.Equal(third) {
		t.Fatalf("after repair serving %q, want third", got.Subject.CommonName)
	}
}

func TestServer_DrainsInFlightRequests(t *testing.T) {
	ts := startServer(t, ServerOptions{DrainTimeout: 10 * time.Second})
	body := review(t, admissionv1.Create, "agents", podResource, "Pod", agentPod())

	// A request whose body is still arriving when the shutdown starts.
	pr, pw := io.Pipe()
	req, err := http.NewRequest(http.MethodPost, ts.url+"/mutate", pr)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	type result struct {
		code int
		body []byte
		err  error
	}
	got := make(chan result, 1)
	go func() {
		resp, err := ts.client.Do(req)
		if err != nil {
			got <- result{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		got <- result{resp.StatusCode, b, err}
	}()
	if _, err := pw.Write(body[:10]); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return ts.srv.activeMutations() == 1 }) // the handler is reading the body

	ts.cancel()
	waitFor(t, func() bool { return ts.srv.draining.Load() })
	// Draining: not ready, and no new connections.
	if _, err := net.DialTimeout("tcp", ts.srv.Addr().String(), time.Second); err == nil {
		t.Error("new connections are still accepted while draining")
	}
	select {
	case <-ts.done:
		t.Fatalf("Serve returned (%v) with a request in flight", ts.serveErr)
	case <-time.After(100 * time.Millisecond):
	}
	if _, err := pw.Write(body[10:]); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	r := <-got
	if r.err != nil || r.code != 200 {
		t.Fatalf("in-flight request: %d %s %v", r.code, r.body, r.err)
	}
	if resp := decodeReview(t, r.body); !resp.Allowed || resp.Patch == nil {
		t.Fatalf("in-flight request was not answered in full: %+v", resp)
	}
	select {
	case <-ts.done:
		if ts.serveErr != nil {
			t.Fatalf("Serve = %v after a clean drain", ts.serveErr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after the drain")
	}
}

func TestServer_ReadyzFailsWhileDraining(t *testing.T) {
	certFile, keyFile, _ := writeTestCert(t, t.TempDir(), "c")
	srv, err := NewServer(ServerOptions{Addr: "127.0.0.1:0", Injector: testInjector(t, "testdata/config.yaml"), CertFile: certFile, KeyFile: keyFile})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.ln.Close()
	srv.draining.Store(true)
	rec := httptest.NewRecorder()
	srv.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz while draining = %d, want 503", rec.Code)
	}
}

func TestNewServer_BadCertificate(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "x")
	if err := os.WriteFile(bad, []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, o := range []ServerOptions{
		{CertFile: bad, KeyFile: bad},
		{CertFile: filepath.Join(dir, "missing"), KeyFile: bad},
		{},
	} {
		o.Addr, o.Injector = "127.0.0.1:0", testInjector(t, "testdata/config.yaml")
		if _, err := NewServer(o); err == nil || !strings.HasPrefix(err.Error(), "injector: ") {
			t.Errorf("%+v: err = %v, want an injector: error", o, err)
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
