package credential

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// The GCP stand-in follows Google's documentation:
//   - Security Token Service, POST /v1/token
//     (https://cloud.google.com/iam/docs/reference/sts/rest/v1/TopLevel/token): grant_type
//     token-exchange, audience = the workload identity provider's full resource name, scope,
//     requested_token_type access_token, subject_token and subject_token_type jwt; answers
//     {access_token, issued_token_type, token_type: "Bearer", expires_in}; errors
//     {"error": "invalid_grant", "error_description"} with 400 (RFC 8693 §2.2.2);
//   - IAM Service Account Credentials, POST
//     /v1/projects/-/serviceAccounts/{email}:generateAccessToken with the federated token as
//     Bearer and {"scope": [...], "lifetime": "3600s"}; answers {accessToken, expireTime}
//     (https://cloud.google.com/iam/docs/reference/credentials/rest/v1/projects.serviceAccounts/generateAccessToken).

const (
	gcpAudience  = "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/agents/providers/spiffe"
	gcpFederated = "ya29.federated-4c3b2a1f0e9d8c7b"
	gcpSAToken   = "ya29.c.sa-token-7a6b5c4d3e2f1a0b"
	gcpSA        = "agent@proj.iam.gserviceaccount.com"
)

func gcpStandIn(t *testing.T, svids *svidIssuer) (srvURL, ca string, impersonations *atomic.Int32) {
	impersonations = new(atomic.Int32)
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/token", func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		f := r.PostForm
		if f.Get("grant_type") != GrantTokenExchange || f.Get("audience") != gcpAudience ||
			f.Get("requested_token_type") != TokenTypeAccessToken || f.Get("subject_token_type") != TokenTypeJWT {
			oauthErrorBody(w, 400, "invalid_request", "Invalid value for grant_type, audience or token types.")
			return
		}
		if sub, why := svids.verify(f.Get("subject_token"), "https://iam.googleapis.com/"+strings.TrimPrefix(gcpAudience, "//iam.googleapis.com/")); sub == "" {
			oauthErrorBody(w, 400, "invalid_grant", "The audience in ID Token does not match the expected audience. "+why)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"access_token": gcpFederated, "issued_token_type": TokenTypeAccessToken,
			"token_type": "Bearer", "expires_in": 3600})
	})
	mux.HandleFunc("POST /v1/projects/-/serviceAccounts/{sa}", func(w http.ResponseWriter, r *http.Request) {
		if r.PathValue("sa") != gcpSA+":generateAccessToken" {
			http.Error(w, `{"error":{"code":404,"message":"Not found","status":"NOT_FOUND"}}`, 404)
			return
		}
		if r.Header.Get("Authorization") != "Bearer "+gcpFederated {
			w.WriteHeader(401)
			fmt.Fprint(w, `{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}`)
			return
		}
		var body struct {
			Scope    []string `json:"scope"`
			Lifetime string   `json:"lifetime"`
		}
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil || len(body.Scope) == 0 {
			w.WriteHeader(400)
			fmt.Fprint(w, `{"error":{"code":400,"message":"Scope required.","status":"INVALID_ARGUMENT"}}`)
			return
		}
		impersonations.Add(1)
		json.NewEncoder(w).Encode(map[string]any{"accessToken": gcpSAToken, "expireTime": time.Now().Add(time.Hour).UTC().Format(time.RFC3339)})
	})
	srv, ca := tlsStandIn(t, mux)
	return srv.URL, ca, impersonations
}

func TestGCP_ExchangesTheJWTSVIDAtSTSThenImpersonates(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	u, ca, imp := gcpStandIn(t, svids)
	aud := "https://iam.googleapis.com/" + strings.TrimPrefix(gcpAudience, "//iam.googleapis.com/")
	opts := GCPOptions{Audience: gcpAudience, SubjectTokenAudience: aud, STSURL: u + "/v1/token", IAMURL: u, CAFile: ca}
	p, err := NewGCP(opts, testDeps(svids))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "gcp", Subject: subjA})
	if err != nil {
		t.Fatal(err)
	}
	if tok.Value() != gcpFederated || time.Until(tok.ExpiresAt()) < 59*time.Minute {
		t.Errorf("federated token %v expiring %v", tok, tok.ExpiresAt())
	}
	opts.ServiceAccount = gcpSA
	p, _ = NewGCP(opts, testDeps(svids))
	tok, err = p.Fetch(context.Background(), FetchArgs{Name: "gcp", Subject: subjA})
	if err != nil {
		t.Fatal(err)
	}
	if tok.Value() != gcpSAToken || imp.Load() != 1 {
		t.Errorf("impersonated token %v after %d impersonations", tok, imp.Load())
	}

	opts.SubjectTokenAudience = "wrong"
	p, _ = NewGCP(opts, testDeps(svids))
	_, err = p.Fetch(context.Background(), FetchArgs{Name: "gcp", Subject: subjA})
	if err == nil || !strings.Contains(err.Error(), "invalid_grant") {
		t.Fatalf("wrong audience: %v; want invalid_grant", err)
	}
	assertNoSecrets(t, "gcp error", err.Error(), svids.issuedTokens()...)
}

// The Azure stand-in follows "Microsoft identity platform and the OAuth 2.0 client credentials
// flow", third case, access token request with a federated credential
// (https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-client-creds-grant-flow#third-case-access-token-request-with-a-federated-credential):
// POST /{tenant}/oauth2/v2.0/token with client_id, scope, grant_type=client_credentials,
// client_assertion_type jwt-bearer and client_assertion (audience api://AzureADTokenExchange);
// answers {token_type, expires_in, ext_expires_in, access_token}; errors {error,
// error_description "AADSTS...", error_codes, timestamp, trace_id, correlation_id}.

const azureToken = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.azure-access-token"

func TestAzure_ClientCredentialsWithTheJWTSVIDAsAssertion(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	srv, ca := tlsStandIn(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		f := r.PostForm
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		if r.Method != http.MethodPost || r.URL.Path != "/tenant-1/oauth2/v2.0/token" {
			w.WriteHeader(404)
			return
		}
		fail := func(code int, aadsts string) {
			w.WriteHeader(400)
			json.NewEncoder(w).Encode(map[string]any{"error": "invalid_client", "error_description": fmt.Sprintf("AADSTS%d: %s", code, aadsts),
				"error_codes": []int{code}, "timestamp": "2026-01-01 00:00:00Z", "trace_id": "t", "correlation_id": "c"})
		}
		if f.Get("client_id") != "app-1" {
			fail(700016, "Application with identifier 'x' was not found in the directory.")
			return
		}
		if f.Get("grant_type") != "client_credentials" || f.Get("scope") != "https://management.azure.com/.default" ||
			f.Get("client_assertion_type") != AssertionTypeJWT {
			fail(900144, "The request body must contain the following parameter.")
			return
		}
		if sub, _ := svids.verify(f.Get("client_assertion"), "api://AzureADTokenExchange"); sub != subjA {
			fail(700211, "No matching federated identity record found for presented assertion audience.")
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": azureToken})
	}))
	p, err := NewAzure(AzureOptions{TenantID: "tenant-1", ClientID: "app-1", Scope: "https://management.azure.com/.default",
		AuthorityURL: srv.URL, CAFile: ca}, testDeps(svids))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "azure", Subject: subjA})
	if err != nil {
		t.Fatal(err)
	}
	if tok.Value() != azureToken || KindOf(p) != "azure" {
		t.Errorf("token %v kind %s", tok, KindOf(p))
	}
	bad, _ := NewAzure(AzureOptions{TenantID: "tenant-1", ClientID: "app-1", Scope: "https://management.azure.com/.default",
		JWTAudience: "api://wrong", AuthorityURL: srv.URL, CAFile: ca}, testDeps(svids))
	_, err = bad.Fetch(context.Background(), FetchArgs{Name: "azure", Subject: subjA})
	var ee *EndpointError
	if !errors.As(err, &ee) || ee.Code != "invalid_client" || !strings.Contains(err.Error(), "AADSTS700211") {
		t.Fatalf("wrong audience: %v", err)
	}
	assertNoSecrets(t, "azure error", err.Error(), svids.issuedTokens()...)
}
