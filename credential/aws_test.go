package credential

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/escrowproxy/escrow/config"
)

// The STS stand-in follows the AssumeRoleWithWebIdentity API reference
// (https://docs.aws.amazon.com/STS/latest/APIReference/API_AssumeRoleWithWebIdentity.html): a
// form POST with Action, Version=2011-06-15, RoleArn, RoleSessionName, WebIdentityToken and
// DurationSeconds, unsigned; the XML AssumeRoleWithWebIdentityResponse with Credentials
// (AccessKeyId, SecretAccessKey, SessionToken, Expiration); and errors as an XML ErrorResponse
// with status 400 (InvalidIdentityToken, ...), per "Common Errors".

const (
	stsAccessKey = "ASIAIOSFODNN7EXAMPLE"
	stsSecretKey = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
	stsSession   = "FwoGZXIvYXdzEBYaDEXAMPLESESSIONTOKENxyz"
)

func stsStandIn(t *testing.T, svids *svidIssuer, audience string) (url, ca string, form *atomic.Pointer[map[string]string]) {
	form = new(atomic.Pointer[map[string]string])
	srv, ca := tlsStandIn(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		f := map[string]string{}
		for k := range r.PostForm {
			f[k] = r.PostForm.Get(k)
		}
		form.Store(&f)
		w.Header().Set("Content-Type", "text/xml")
		if r.Header.Get("Authorization") != "" {
			t.Errorf("AssumeRoleWithWebIdentity was signed; it takes no credentials")
		}
		if f["Action"] != "AssumeRoleWithWebIdentity" || f["Version"] != "2011-06-15" {
			w.WriteHeader(400)
			fmt.Fprint(w, `<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>InvalidAction</Code><Message>Could not find operation</Message></Error><RequestId>r1</RequestId></ErrorResponse>`)
			return
		}
		if sub, why := svids.verify(f["WebIdentityToken"], audience); sub == "" {
			w.WriteHeader(400)
			fmt.Fprintf(w, `<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>Incorrect token audience (%s) %s</Message></Error><RequestId>r2</RequestId></ErrorResponse>`, why, f["WebIdentityToken"])
			return
		}
		exp := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
		fmt.Fprintf(w, `<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>%s</SubjectFromWebIdentityToken>
    <Audience>%s</Audience>
    <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/agent/%s</Arn><AssumedRoleId>AROACLKWSDQRAOEXAMPLE:s</AssumedRoleId></AssumedRoleUser>
    <Credentials>
      <SessionToken>%s</SessionToken>
      <SecretAccessKey>%s</SecretAccessKey>
      <Expiration>%s</Expiration>
      <AccessKeyId>%s</AccessKeyId>
    </Credentials>
    <Provider>spiffe</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>`, subjA, audience, f["RoleSessionName"], stsSession, stsSecretKey, exp, stsAccessKey)
	}))
	return srv.URL, ca, form
}

func TestAWS_AssumeRoleWithWebIdentityWithTheJWTSVID(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	u, ca, form := stsStandIn(t, svids, "sts.amazonaws.com")
	p, err := NewAWS(AWSOptions{RoleARN: "arn:aws:iam::123456789012:role/agent", WebIdentityAudience: "sts.amazonaws.com",
		Region: "us-east-1", STSEndpoint: u, Duration: 15 * time.Minute, CAFile: ca}, testDeps(svids))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "s3", Subject: subjA})
	if err != nil {
		t.Fatal(err)
	}
	if tok.Part(PartAccessKeyID) != stsAccessKey || tok.Part(PartSecretAccessKey) != stsSecretKey || tok.Part(PartSessionToken) != stsSession {
		t.Errorf("parts not taken from the answer")
	}
	if tok.ID() != stsAccessKey {
		t.Errorf("credential_id %q; want the access key ID", tok.ID())
	}
	f := *form.Load()
	if f["RoleArn"] != "arn:aws:iam::123456789012:role/agent" || f["DurationSeconds"] != "900" ||
		f["RoleSessionName"] != "example.org-ns-agents-sa-coder" {
		t.Errorf("request form %v", f)
	}
	assertNoSecrets(t, "token formatting", fmt.Sprintf("%v %+v %#v %s", tok, tok, tok, tok), stsSecretKey, stsSession)

	// Through the Manager the ID stays the access key ID.
	m := NewManager(map[string]Provider{"s3": p}, Options{})
	if got := get(t, m, Request{Name: "s3", Subject: subjA}); got.ID() != stsAccessKey {
		t.Errorf("Manager's token ID %q", got.ID())
	}
}

func TestAWS_STSErrorsKeepTheCodeNotTheToken(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	u, ca, _ := stsStandIn(t, svids, "sts.amazonaws.com")
	p, _ := NewAWS(AWSOptions{RoleARN: "arn:aws:iam::1:role/r", WebIdentityAudience: "wrong-audience",
		Region: "us-east-1", STSEndpoint: u, CAFile: ca}, testDeps(svids))
	_, err := p.Fetch(context.Background(), FetchArgs{Name: "s3", Subject: subjA})
	if err == nil || !strings.Contains(err.Error(), "InvalidIdentityToken") {
		t.Fatalf("error %v; want InvalidIdentityToken", err)
	}
	assertNoSecrets(t, "sts error", err.Error(), svids.issuedTokens()...)
}

func awsToken() Token {
	return NewTokenParts("s3", map[string]string{PartAccessKeyID: stsAccessKey, PartSecretAccessKey: stsSecretKey, PartSessionToken: stsSession},
		time.Now().Add(time.Hour)).withID(stsAccessKey)
}

// verifySigV4 recomputes the signature the way a server does: from the request as received,
// with the date it names, and compares.
func verifySigV4(t *testing.T, r *http.Request, service, region, payload string, disableEscape bool) {
	t.Helper()
	auth := r.Header.Get("Authorization")
	if !strings.HasPrefix(auth, "AWS4-HMAC-SHA256 Credential="+stsAccessKey+"/") || !strings.Contains(auth, "/"+region+"/"+service+"/aws4_request") {
		t.Fatalf("Authorization %q", auth)
	}
	when, err := time.Parse("20060102T150405Z", r.Header.Get("X-Amz-Date"))
	if err != nil {
		t.Fatalf("X-Amz-Date: %v", err)
	}
	c := r.Clone(context.Background())
	c.Header.Del("Authorization")
	s := v4.NewSigner(func(o *v4.SignerOptions) { o.DisableURIPathEscaping = disableEscape })
	if err := s.SignHTTP(context.Background(), aws.Credentials{AccessKeyID: stsAccessKey, SecretAccessKey: stsSecretKey, SessionToken: stsSession},
		c, payload, service, region, when); err != nil {
		t.Fatal(err)
	}
	if c.Header.Get("Authorization") != auth {
		t.Errorf("signature does not verify:\n got %s\nwant %s", auth, c.Header.Get("Authorization"))
	}
}

type trackingBody struct {
	io.Reader
	reads atomic.Int32
}

func (b *trackingBody) Read(p []byte) (int, error) { b.reads.Add(1); return b.Reader.Read(p) }
func (b *trackingBody) Close() error               { return nil }

func TestSigV4_SignsS3UnsignedPayloadWithoutReadingTheBody(t *testing.T) {
	a, err := NewApplier(config.Injection{Kind: config.InjectSigV4, Region: "us-east-1", Service: "s3"})
	if err != nil {
		t.Fatal(err)
	}
	body := &trackingBody{Reader: strings.NewReader("a large upload")}
	r, _ := http.NewRequest(http.MethodPut, "https://minio.internal:9000/bucket/some%20key.txt?X-Amz-Signature=agent&x-id=PutObject", body)
	r.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDAGENT/...")
	r.Header.Set("X-Amz-Date", "20200101T000000Z")
	r.Header.Set("X-Amz-Security-Token", "agent-token")
	r.Header.Set("x-amz-content-sha256", "agent-hash")
	if err := a.Apply(r, awsToken()); err != nil {
		t.Fatal(err)
	}
	if body.reads.Load() != 0 || r.Body != body {
		t.Errorf("the body was read or replaced: an S3 upload must stream")
	}
	if r.Header.Get("X-Amz-Content-Sha256") != "UNSIGNED-PAYLOAD" || r.Header.Get("X-Amz-Security-Token") != stsSession {
		t.Errorf("headers %v", r.Header)
	}
	if strings.Contains(r.URL.RawQuery, "X-Amz-Signature") || !strings.Contains(r.URL.RawQuery, "x-id=PutObject") {
		t.Errorf("query %q: the agent's presign parameter must go, others stay", r.URL.RawQuery)
	}
	for _, v := range r.Header.Values("Authorization") {
		if strings.Contains(v, "AKIDAGENT") {
			t.Errorf("the agent's Authorization survived")
		}
	}
	verifySigV4(t, r, "s3", "us-east-1", "UNSIGNED-PAYLOAD", true)
}

func TestSigV4_HashesTheBodyForOtherServicesAndDerivesTheService(t *testing.T) {
	a, _ := NewSigV4Applier(SigV4Options{Region: "eu-west-1"})
	payload := `{"TableName":"t"}`
	r, _ := http.NewRequest(http.MethodPost, "https://dynamodb.eu-west-1.amazonaws.com/", strings.NewReader(payload))
	r.Header.Set("X-Amz-Target", "DynamoDB_20120810.DescribeTable")
	if err := a.Apply(r, awsToken()); err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(r.Body)
	if string(b) != payload {
		t.Errorf("body after signing %q", b)
	}
	verifySigV4(t, r, "dynamodb", "eu-west-1", sha256hex(payload), false)

	r2, _ := http.NewRequest(http.MethodGet, "http://10.0.0.1:9000/", nil)
	if err := a.Apply(r2, awsToken()); err == nil || !errors.Is(err, ErrUnavailable) {
		t.Errorf("underivable service: %v; want ErrUnavailable", err)
	}
	if err := a.Apply(r, NewToken("s3", "single", time.Time{})); !errors.Is(err, ErrUnavailable) {
		t.Errorf("a non-AWS token: %v", err)
	}
	if r.Header.Get("Authorization") != "" {
		t.Errorf("a failed Apply left an Authorization header")
	}
}

func sha256hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func TestServiceFromHost(t *testing.T) {
	for host, want := range map[string]string{
		"s3.us-east-1.amazonaws.com":                 "s3",
		"bucket.s3.amazonaws.com":                    "s3",
		"bucket.s3-fips.us-gov-west-1.amazonaws.com": "s3",
		"s3.amazonaws.com:443":                       "s3",
		"dynamodb.us-east-1.amazonaws.com":           "dynamodb",
		"sts.amazonaws.com":                          "sts",
		"bedrock-runtime.us-west-2.amazonaws.com":    "bedrock-runtime",
		"example.com":                                "",
		"127.0.0.1:9000":                             "",
	} {
		if got := serviceFromHost(host); got != want {
			t.Errorf("%s: %q; want %q", host, got, want)
		}
	}
}

func TestSigV4_KeepsAnUnsignedStreamingUploadAndRefusesAChunkSignedOne(t *testing.T) {
	a, _ := NewSigV4Applier(SigV4Options{Region: "us-east-1", Service: "s3"})
	r, _ := http.NewRequest(http.MethodPut, "https://s3.us-east-1.amazonaws.com/b/k", strings.NewReader("5\r\nhello\r\n0\r\n"))
	r.Header.Set("Content-Encoding", "aws-chunked")
	r.Header.Set("X-Amz-Content-Sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER")
	r.Header.Set("X-Amz-Trailer", "x-amz-checksum-crc32")
	if err := a.Apply(r, awsToken()); err != nil {
		t.Fatal(err)
	}
	if r.Header.Get("X-Amz-Content-Sha256") != "STREAMING-UNSIGNED-PAYLOAD-TRAILER" {
		t.Errorf("payload hash %q; the body's encoding must be kept", r.Header.Get("X-Amz-Content-Sha256"))
	}
	verifySigV4(t, r, "s3", "us-east-1", "STREAMING-UNSIGNED-PAYLOAD-TRAILER", true)

	r2, _ := http.NewRequest(http.MethodPut, "https://s3.us-east-1.amazonaws.com/b/k", strings.NewReader("chunks"))
	r2.Header.Set("X-Amz-Content-Sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
	r2.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDAGENT/...")
	if err := a.Apply(r2, awsToken()); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "chunk-signed") {
		t.Errorf("chunk-signed upload: %v; want a refusal", err)
	}
	if r2.Header.Get("Authorization") != "" {
		t.Errorf("the agent's Authorization survived a refused Apply")
	}
}
