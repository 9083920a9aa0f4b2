// Command server is the example's MCP server: the official Go SDK over Streamable HTTP on
// HTTPS, with the tools read_file, search, delete_repo, transfer_repo and admin_reset, two
// resources and a prompt. It
// answers only requests that carry its token (MCP_SERVER_TOKEN), which escrow holds and puts
// on the agent's requests: the agent never sees it. It logs every call it executes.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8443", "listen address")
	host := flag.String("host", "mcp.github.example", "the server's TLS name")
	caOut := flag.String("ca-out", ".mcp-example/server-ca.pem", "where to write the CA escrow verifies the server with")
	jsonMode := flag.Bool("json", false, "answer with JSON instead of SSE streams")
	flag.Parse()
	token := os.Getenv("MCP_SERVER_TOKEN")
	if token == "" {
		log.Fatal("server: set MCP_SERVER_TOKEN")
	}
	cert, err := selfSigned(*host, *caOut)
	if err != nil {
		log.Fatal(err)
	}

	srv := mcp.NewServer(&mcp.Implementation{Name: "example-mcp-server", Version: "1.0.0"}, nil)
	mcp.AddTool(srv, &mcp.Tool{Name: "read_file", Description: "Read a file of the workspace."},
		func(_ context.Context, _ *mcp.CallToolRequest, a struct {
			Path string `json:"path"`
		}) (*mcp.CallToolResult, any, error) {
			log.Printf("server: executed read_file %s", a.Path)
			return text("contents of " + a.Path), nil, nil
		})
	mcp.AddTool(srv, &mcp.Tool{Name: "search", Description: "Search the issues."},
		func(_ context.Context, _ *mcp.CallToolRequest, a struct {
			Query   string `json:"query"`
			PerPage int    `json:"per_page,omitempty"`
		}) (*mcp.CallToolResult, any, error) {
			log.Printf("server: executed search %s (per_page %d)", a.Query, a.PerPage)
			return text("3 issues match " + a.Query), nil, nil
		})
	for _, name := range []string{"delete_repo", "transfer_repo", "admin_reset"} {
		mcp.AddTool(srv, &mcp.Tool{Name: name, Description: "Administer a repository: " + name + "."},
			func(_ context.Context, _ *mcp.CallToolRequest, a struct {
				Name string `json:"name"`
			}) (*mcp.CallToolResult, any, error) {
				log.Printf("server: executed %s %s", name, a.Name)
				return text(name + " done for " + a.Name), nil, nil
			})
	}
	for _, uri := range []string{"file:///docs/readme.md", "file:///etc/shadow"} {
		srv.AddResource(&mcp.Resource{URI: uri, Name: uri, MIMEType: "text/plain"},
			func(_ context.Context, r *mcp.ReadResourceRequest) (*mcp.ReadResourceResult, error) {
				log.Printf("server: read %s", r.Params.URI)
				return &mcp.ReadResourceResult{Contents: []*mcp.ResourceContents{{URI: r.Params.URI, MIMEType: "text/plain", Text: "text of " + r.Params.URI}}}, nil
			})
	}
	srv.AddPrompt(&mcp.Prompt{Name: "review", Arguments: []*mcp.PromptArgument{{Name: "pr"}}},
		func(_ context.Context, r *mcp.GetPromptRequest) (*mcp.GetPromptResult, error) {
			log.Printf("server: prompt review %s", r.Params.Arguments["pr"])
			return &mcp.GetPromptResult{Messages: []*mcp.PromptMessage{{Role: "user", Content: &mcp.TextContent{Text: "Review pull request " + r.Params.Arguments["pr"] + "."}}}}, nil
		})

	// escrow sends the agent's requests with Host: mcp.github.example to this loopback listener;
	// the SDK refuses a non-loopback Host on a loopback listener unless told otherwise.
	h := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return srv },
		&mcp.StreamableHTTPOptions{JSONResponse: *jsonMode, DisableLocalhostProtection: true})
	s := &http.Server{
		Addr:              *addr,
		Handler:           requireToken(token, h),
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 10 * time.Second,
	}
	log.Printf("server: MCP on https://%s/mcp (dial %s)", *host, *addr)
	log.Fatal(s.ListenAndServeTLS("", ""))
}

func text(s string) *mcp.CallToolResult {
	return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: s}}}
}

// requireToken refuses requests without the server's bearer token.
func requireToken(token string, next http.Handler) http.Handler {
	want := []byte("Bearer " + token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			http.Error(w, "missing or wrong token", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// selfSigned makes a throwaway CA and a leaf for host, and writes the CA certificate to caOut.
func selfSigned(host, caOut string) (tls.Certificate, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "example MCP server CA"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: host},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour),
		DNSNames: []string{host}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	if err := os.MkdirAll(dirOf(caOut), 0o755); err != nil {
		return tls.Certificate{}, err
	}
	if err := os.WriteFile(caOut, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		return tls.Certificate{}, fmt.Errorf("server: writing the CA: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: key}, nil
}

func dirOf(p string) string {
	for i := len(p) - 1; i >= 0; i-- {
		if p[i] == '/' {
			return p[:i]
		}
	}
	return "."
}
