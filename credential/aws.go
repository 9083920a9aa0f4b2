package credential

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/aws/smithy-go"
)

// Parts of an AWS credential Token (NewTokenParts).
const (
	PartAccessKeyID     = "access_key_id"
	PartSecretAccessKey = "secret_access_key"
	PartSessionToken    = "session_token"
)

// AWSOptions configures the AWS provider: STS AssumeRoleWithWebIdentity with the pod's
// JWT-SVID as the web identity token.
type AWSOptions struct {
	RoleARN             string // may be empty with an STSEndpoint that takes none (MinIO)
	WebIdentityAudience string // audience of the JWT-SVID, e.g. sts.amazonaws.com
	Region              string
	STSEndpoint         string        // optional override (MinIO, GovCloud, a VPC endpoint)
	Duration            time.Duration // optional; STS's default (1h) when zero
	CAFile              string
}

// NewAWS returns the AWS STS provider. Its tokens have the parts PartAccessKeyID,
// PartSecretAccessKey and PartSessionToken, and their ID is the access key ID (not secret:
// what CloudTrail records), so audit records match the upstream's logs.
func NewAWS(o AWSOptions, d Deps) (Provider, error) {
	c, err := endpointClient(d, o.CAFile)
	if err != nil {
		return nil, fmt.Errorf("credential: aws: %w", err)
	}
	if d.JWT == nil {
		return nil, errors.New("credential: aws: the web identity is a JWT-SVID: needs a SPIFFE identity")
	}
	if (o.RoleARN == "" && o.STSEndpoint == "") || o.Region == "" || o.WebIdentityAudience == "" {
		return nil, errors.New("credential: aws: role_arn (unless sts_endpoint is set), region and web_identity.jwt_svid.audience are required")
	}
	if o.Duration != 0 && (o.Duration < 15*time.Minute || o.Duration > 12*time.Hour) {
		return nil, fmt.Errorf("credential: aws: duration %v is outside STS's 15m..12h", o.Duration)
	}
	client := sts.New(sts.Options{
		Region:           o.Region,
		HTTPClient:       c,
		Credentials:      aws.AnonymousCredentials{}, // AssumeRoleWithWebIdentity is unsigned
		RetryMaxAttempts: 1,                          // the Manager retries, with backoff
	}, func(so *sts.Options) {
		if o.STSEndpoint != "" {
			so.BaseEndpoint = aws.String(o.STSEndpoint)
		}
	})
	return &awsProvider{o: o, sts: client, d: d}, nil
}

type awsProvider struct {
	o   AWSOptions
	sts *sts.Client
	d   Deps
}

func (p *awsProvider) Kind() string { return "aws" }

func (p *awsProvider) Fetch(ctx context.Context, args FetchArgs) (Token, error) {
	jwt, err := jwtSVID(ctx, p.d, p.o.WebIdentityAudience, args.Subject)
	if err != nil {
		return Token{}, err
	}
	in := &sts.AssumeRoleWithWebIdentityInput{
		RoleArn:          aws.String(p.o.RoleARN),
		RoleSessionName:  aws.String(sessionName(args.Subject)),
		WebIdentityToken: aws.String(jwt),
	}
	if p.o.Duration > 0 {
		in.DurationSeconds = aws.Int32(int32(p.o.Duration / time.Second))
	}
	out, err := p.sts.AssumeRoleWithWebIdentity(ctx, in)
	if err != nil {
		return Token{}, stsError(err, jwt)
	}
	cr := out.Credentials
	if cr == nil || cr.AccessKeyId == nil || cr.SecretAccessKey == nil || cr.SessionToken == nil || cr.Expiration == nil {
		return Token{}, errors.New("sts: AssumeRoleWithWebIdentity answered without complete credentials")
	}
	tok := NewTokenParts(args.Name, map[string]string{
		PartAccessKeyID:     *cr.AccessKeyId,
		PartSecretAccessKey: *cr.SecretAccessKey,
		PartSessionToken:    *cr.SessionToken,
	}, *cr.Expiration)
	return tok.withID(*cr.AccessKeyId), nil
}

// stsError keeps the AWS error code and message (e.g. InvalidIdentityToken) and drops the rest.
func stsError(err error, secrets ...string) error {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return fmt.Errorf("sts: AssumeRoleWithWebIdentity: %s: %s", scrub(ae.ErrorCode(), secrets...), scrub(ae.ErrorMessage(), secrets...))
	}
	return fmt.Errorf("sts: AssumeRoleWithWebIdentity: %s", scrub(err.Error(), secrets...))
}

var sessionNameBad = regexp.MustCompile(`[^\w+=,.@-]+`)

// sessionName derives the RoleSessionName (2-64 of [\w+=,.@-]) from the SPIFFE ID, so
// CloudTrail shows which workload assumed the role.
func sessionName(subject string) string {
	s := strings.TrimPrefix(subject, "spiffe://")
	s = sessionNameBad.ReplaceAllString(s, "-")
	s = strings.Trim(s, "-")
	if len(s) > 64 {
		s = s[len(s)-64:]
	}
	if len(s) < 2 {
		s = "escrow"
	}
	return s
}

// SigV4Options configures the SigV4 Applier.
type SigV4Options struct {
	Region  string
	Service string // "" derives it from each request's host (s3, dynamodb, ...)
	// MaxBufferedBody bounds how much of a body is read to hash it for services that do not
	// take UNSIGNED-PAYLOAD; larger bodies are refused. Default 10 MiB.
	MaxBufferedBody int64
}

// NewSigV4Applier returns an Applier that signs each request with AWS Signature Version 4
// using the AWS SDK's signer, with the multi-part token of an aws credential.
//
// Whatever the agent sent that belongs to a signature is removed first: the Authorization,
// X-Amz-Date, X-Amz-Security-Token and X-Amz-Content-Sha256 headers and the presigned-URL query
// parameters. S3 requests are signed with UNSIGNED-PAYLOAD so bodies stream unbuffered; for
// other services the body is read (up to MaxBufferedBody) to hash it.
func NewSigV4Applier(o SigV4Options) (Applier, error) {
	if o.Region == "" {
		return nil, errors.New("credential: sigv4: region is required")
	}
	if o.MaxBufferedBody <= 0 {
		o.MaxBufferedBody = 10 << 20
	}
	return &sigv4Applier{o: o,
		s3:    v4.NewSigner(func(so *v4.SignerOptions) { so.DisableURIPathEscaping = true }),
		other: v4.NewSigner(),
	}, nil
}

type sigv4Applier struct {
	o         SigV4Options
	s3, other *v4.Signer
}

const (
	unsignedPayload          = "UNSIGNED-PAYLOAD"
	streamingUnsignedTrailer = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
)

// presignParams are the query parameters of a presigned URL.
var presignParams = []string{"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
	"X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token"}

func (a *sigv4Applier) Apply(r *http.Request, tok Token) error {
	// An aws-chunked body's payload hash names its encoding; the unsigned kind does not depend
	// on the key and is kept (the AWS CLI and SDKs upload with it), the signed kinds carry
	// per-chunk signatures under the agent's key, which cannot be re-signed without rewriting
	// the body.
	streaming := ""
	if h := r.Header.Get("X-Amz-Content-Sha256"); strings.HasPrefix(h, "STREAMING-") {
		streaming = h
	}
	for _, h := range []string{"Authorization", "Proxy-Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-Sha256"} {
		stripHeader(r.Header, h)
	}
	if r.URL != nil && r.URL.RawQuery != "" {
		for _, p := range presignParams {
			r.URL.RawQuery = stripQueryParam(r.URL.RawQuery, p)
		}
	}
	ak, sk, st := tok.Part(PartAccessKeyID), tok.Part(PartSecretAccessKey), tok.Part(PartSessionToken)
	if !tok.multi || ak == "" || sk == "" {
		return unavailable(tok.name, fmt.Errorf("cannot sign with %s: it is not an AWS credential", tok))
	}
	if r.URL == nil {
		return unavailable(tok.name, errors.New("cannot sign a request without a URL"))
	}
	if r.Header == nil {
		r.Header = make(http.Header)
	}
	host := r.Host
	if host == "" {
		host = r.URL.Host
	}
	service := a.o.Service
	if service == "" {
		service = serviceFromHost(host)
		if service == "" {
			return unavailable(tok.name, fmt.Errorf("cannot derive the AWS service from host %q: set service", host))
		}
	}
	signer, hash := a.other, ""
	switch {
	case streaming == streamingUnsignedTrailer:
		if service == "s3" {
			signer = a.s3
		}
		hash = streaming
		r.Header.Set("X-Amz-Content-Sha256", hash)
	case streaming != "":
		return unavailable(tok.name, fmt.Errorf("sigv4: the agent sent a chunk-signed upload (%s), which cannot be re-signed; configure its client for unsigned payloads", streaming))
	case service == "s3":
		signer, hash = a.s3, unsignedPayload
		r.Header.Set("X-Amz-Content-Sha256", unsignedPayload)
	default:
		h, err := a.bodyHash(r)
		if err != nil {
			return unavailable(tok.name, err)
		}
		hash = h
	}
	creds := aws.Credentials{AccessKeyID: ak, SecretAccessKey: sk, SessionToken: st}
	if err := signer.SignHTTP(r.Context(), creds, r, hash, service, a.o.Region, time.Now()); err != nil {
		return unavailable(tok.name, fmt.Errorf("sigv4: %w", err))
	}
	return nil
}

// bodyHash reads the body (bounded), puts it back and returns its hex SHA-256.
func (a *sigv4Applier) bodyHash(r *http.Request) (string, error) {
	if r.Body == nil || r.Body == http.NoBody {
		sum := sha256.Sum256(nil)
		return hex.EncodeToString(sum[:]), nil
	}
	b, err := io.ReadAll(io.LimitReader(r.Body, a.o.MaxBufferedBody+1))
	r.Body.Close()
	if err != nil {
		return "", fmt.Errorf("sigv4: reading the body to sign it: %w", err)
	}
	if int64(len(b)) > a.o.MaxBufferedBody {
		return "", fmt.Errorf("sigv4: body larger than %d bytes; this service needs it hashed", a.o.MaxBufferedBody)
	}
	r.Body = io.NopCloser(bytes.NewReader(b))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
	r.ContentLength = int64(len(b))
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}

// serviceFromHost derives the SigV4 service name from an AWS endpoint host:
// s3.us-east-1.amazonaws.com, bucket.s3.amazonaws.com, s3-fips... → s3;
// dynamodb.us-east-1.amazonaws.com → dynamodb; sts.amazonaws.com → sts. "" when the host is
// not an AWS endpoint.
func serviceFromHost(host string) string {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	labels := strings.Split(strings.ToLower(strings.TrimSuffix(host, ".")), ".")
	end := -1
	for i, l := range labels {
		if l == "amazonaws" {
			end = i
			break
		}
	}
	if end <= 0 {
		return ""
	}
	for _, l := range labels[:end] {
		if l == "s3" || strings.HasPrefix(l, "s3-") {
			return "s3"
		}
	}
	i := end - 1
	if regionLike.MatchString(labels[i]) && i > 0 {
		i--
	}
	return labels[i]
}

var regionLike = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-\d+$`)
