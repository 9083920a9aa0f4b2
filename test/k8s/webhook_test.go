package k8s_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// webhook is a running `escrow webhook` on loopback, configured from the chart's injector
// ConfigMap, serving a certificate for 127.0.0.1 from a CA of the test's.
type webhook struct {
	proc   *process
	addr   string
	caPEM  []byte
	client *http.Client
	args   []string
}

// injectorConfig returns the injector config file the chart renders for the webhook.
func injectorConfig(t testing.TB, objs []object) string {
	t.Helper()
	for _, cm := range find(objs, "ConfigMap") {
		var c struct {
			Data map[string]string `json:"data"`
		}
		cm.into(t, &c)
		if v, ok := c.Data["injector.yaml"]; ok {
			return v
		}
	}
	t.Fatal("the chart renders no injector.yaml ConfigMap")
	return ""
}

func startWebhook(t testing.TB, objs []object) *webhook {
	t.Helper()
	bin := escrow(t)
	dir := t.TempDir()
	caPEM, certFile, keyFile := serveCert(t, dir)
	cfgFile := filepath.Join(dir, "injector.yaml")
	if err := os.WriteFile(cfgFile, []byte(injectorConfig(t, objs)), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	w := &webhook{
		addr:   addr,
		caPEM:  caPEM,
		client: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}},
		args:   []string{"webhook", "--listen", addr, "--tls-cert", certFile, "--tls-key", keyFile, "--config", cfgFile},
	}
	w.start(t, bin)
	return w
}

func (w *webhook) start(t testing.TB, bin string) {
	t.Helper()
	w.proc = start(t, bin, w.args...)
	eventually(t, 20*time.Second, "escrow webhook /readyz", func() error {
		if w.proc.exited() {
			t.Fatalf("escrow webhook exited:\n%s", w.proc.output())
		}
		res, err := w.client.Get("https://" + w.addr + "/readyz")
		if err != nil {
			return err
		}
		res.Body.Close()
		if res.StatusCode != 200 {
			return fmt.Errorf("status %d", res.StatusCode)
		}
		return nil
	})
}

func (w *webhook) url() string { return "https://" + w.addr + "/mutate" }

// review sends one AdmissionReview for a pod CREATE and returns the response part.
func (w *webhook) review(t testing.TB, namespace string, podJSON []byte) admissionResponse {
	t.Helper()
	req := map[string]any{
		"apiVersion": "admission.k8s.io/v1",
		"kind":       "AdmissionReview",
		"request": map[string]any{
			"uid":       fmt.Sprintf("test-%d", time.Now().UnixNano()),
			"kind":      map[string]string{"group": "", "version": "v1", "kind": "Pod"},
			"resource":  map[string]string{"group": "", "version": "v1", "resource": "pods"},
			"namespace": namespace,
			"operation": "CREATE",
			"userInfo":  map[string]any{"username": "test"},
			"object":    json.RawMessage(podJSON),
		},
	}
	body, _ := json.Marshal(req)
	res, err := w.client.Post(w.url(), "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode != 200 {
		t.Fatalf("webhook answered %d: %s", res.StatusCode, b)
	}
	var out struct {
		Response admissionResponse `json:"response"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("webhook answer: %v: %s", err, b)
	}
	return out.Response
}

type admissionResponse struct {
	UID     string `json:"uid"`
	Allowed bool   `json:"allowed"`
	Patch   []byte `json:"patch"`
	Result  *struct {
		Message string `json:"message"`
	} `json:"status"`
}

// serveCert writes a CA and a serving certificate for 127.0.0.1 and localhost into dir.
func serveCert(t testing.TB, dir string) (caPEM []byte, certFile, keyFile string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "escrow k8s test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTpl, caTpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return caPEM, certFile, keyFile
}
