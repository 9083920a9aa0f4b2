package main

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
	"errors"
	"flag"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// writeServingCert writes a self-signed certificate for 127.0.0.1, replacing the files
// atomically as the kubelet does for a mounted Secret.
func writeServingCert(t *testing.T, dir, cn string) (certFile, keyFile string, cert *x509.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, BasicConstraintsValid: true, IsCA: true,
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
	for path, data := range map[string][]byte{
		keyFile:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}),
		certFile: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
	} {
		if err := os.WriteFile(path+".tmp", data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(path+".tmp", path); err != nil {
			t.Fatal(err)
		}
	}
	cert, _ = x509.ParseCertificate(der)
	return certFile, keyFile, cert
}

// listenAddr waits for the "listening" log line and returns its address.
func listenAddr(t *testing.T, log *lockedBuffer, done <-chan error) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		for line := range strings.SplitSeq(log.String(), "\n") {
			var rec struct {
				Msg  string `json:"msg"`
				Addr string `json:"addr"`
			}
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "escrow webhook listening" {
				return rec.Addr
			}
		}
		select {
		case err := <-done:
			t.Fatalf("escrow webhook exited: %v\n%s", err, log.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("escrow webhook did not log its address:\n%s", log.String())
	return ""
}

func TestCmdWebhook_ServesRotatesAndDrains(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, cert := writeServingCert(t, dir, "first")
	cfgFile := filepath.Join(dir, "injector.yaml")
	if err := os.WriteFile(cfgFile, []byte("image: escrowproxy/escrow:v1.0.0\nnamespace: escrow-system\nservice_cidrs: [10.96.0.0/12]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- cmdWebhook(ctx, []string{"--listen", "127.0.0.1:0", "--tls-cert", certFile, "--tls-key", keyFile, "--config", cfgFile}, &stdout, &stderr)
	}()
	addr := listenAddr(t, &stderr, done)

	pool := x509.NewCertPool()
	pool.AddCert(cert)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}

	pod := corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: "agent", Namespace: "agents"},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "agent", Image: "agent:1"}}},
	}
	raw, _ := json.Marshal(&pod)
	body, _ := json.Marshal(admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID: "0b5d1f7e-1", Kind: metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Resource:  metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
			Namespace: "agents", Operation: admissionv1.Create, Object: runtime.RawExtension{Raw: raw},
		},
	})
	resp, err := client.Post("https://"+addr+"/mutate", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	rb, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var ar admissionv1.AdmissionReview
	if err := json.Unmarshal(rb, &ar); err != nil || ar.Response == nil || !ar.Response.Allowed || ar.Response.UID != "0b5d1f7e-1" {
		t.Fatalf("response %d %s (%v)", resp.StatusCode, rb, err)
	}
	p, err := jsonpatch.DecodePatch(ar.Response.Patch)
	if err != nil {
		t.Fatal(err)
	}
	patched, err := p.Apply(raw)
	if err != nil {
		t.Fatal(err)
	}
	var out corev1.Pod
	if err := json.Unmarshal(patched, &out); err != nil {
		t.Fatal(err)
	}
	if len(out.Spec.InitContainers) != 1 || out.Spec.InitContainers[0].Image != "escrowproxy/escrow:v1.0.0" {
		t.Fatalf("the config file's image is not injected: %+v", out.Spec.InitContainers)
	}
	noProxy := ""
	for _, e := range out.Spec.Containers[0].Env {
		if e.Name == "NO_PROXY" {
			noProxy = e.Value
		}
	}
	if !strings.Contains(noProxy, "10.96.0.0/12") {
		t.Errorf("NO_PROXY = %q, want the configured service CIDR", noProxy)
	}

	// Rotation: new files, same process, new certificate served.
	_, _, second := writeServingCert(t, dir, "second")
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	served := conn.ConnectionState().PeerCertificates[0]
	conn.Close()
	if !served.Equal(second) {
		t.Fatalf("after rotation serving %q, want second", served.Subject.CommonName)
	}

	// SIGTERM (the context main cancels): a clean drain and exit.
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("cmdWebhook = %v after SIGTERM", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("escrow webhook did not exit after SIGTERM")
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("still listening after exit")
	}
	if !strings.Contains(stderr.String(), `"result":"injected"`) {
		t.Errorf("no admission log line:\n%s", stderr.String())
	}
}

func TestCmdWebhook_Flags(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, _ := writeServingCert(t, dir, "c")
	badCfg := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(badCfg, []byte("imag: x\nspiffe: {source: nfs}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		args    []string
		wantErr error
		wantOut string // in stdout+stderr or the error
	}{
		{"help", []string{"--help"}, flag.ErrHelp, "--tls-cert"},
		{"no cert", []string{"--tls-key", keyFile}, errUsage, "--tls-cert and --tls-key are required"},
		{"stray argument", []string{"--tls-cert", certFile, "--tls-key", keyFile, "extra"}, errUsage, "unexpected arguments"},
		{"bad flag", []string{"--nope"}, errUsage, "flag provided but not defined"},
		{"bad log level", []string{"--tls-cert", certFile, "--tls-key", keyFile, "--log-level", "loud"}, errUsage, "--log-level"},
		{"bad drain", []string{"--tls-cert", certFile, "--tls-key", keyFile, "--drain-timeout", "0s"}, errUsage, "--drain-timeout"},
		{"config errors with paths", []string{"--tls-cert", certFile, "--tls-key", keyFile, "--config", badCfg}, nil, "imag: unknown key"},
		{"missing cert file", []string{"--tls-cert", filepath.Join(dir, "none"), "--tls-key", keyFile, "--check"}, nil, "injector: TLS certificate"},
		{"check", []string{"--tls-cert", certFile, "--tls-key", keyFile, "--check"}, nil, "webhook config ok"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr lockedBuffer
			err := cmdWebhook(ctx, tc.args, &stdout, &stderr)
			all := stdout.String() + stderr.String()
			if err != nil {
				all += err.Error()
			}
			switch {
			case tc.wantErr != nil && !errors.Is(err, tc.wantErr):
				t.Errorf("err = %v, want %v", err, tc.wantErr)
			case tc.wantErr == nil && tc.name == "check" && err != nil:
				t.Errorf("err = %v", err)
			case tc.wantErr == nil && tc.name != "check" && err == nil:
				t.Error("no error")
			}
			if !strings.Contains(all, tc.wantOut) {
				t.Errorf("output lacks %q:\n%s", tc.wantOut, all)
			}
		})
	}
	// The whole binary's dispatch knows the command.
	var out, errOut bytes.Buffer
	if code := run([]string{"webhook", "--help"}, &out, &errOut); code != 0 || !strings.Contains(out.String(), "escrow webhook --tls-cert") {
		t.Errorf("escrow webhook --help: exit %d, %s", code, out.String())
	}
	if code := run([]string{"--help"}, &out, &errOut); code != 0 || !strings.Contains(out.String(), "webhook") {
		t.Errorf("usage does not list webhook")
	}
}
