package attest

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// jwtFetchTimeout bounds one JWT-SVID fetch from the Workload API. The fetch is shared by every
// caller waiting for that audience, so it is not bounded by any one caller's context.
const jwtFetchTimeout = 10 * time.Second

type jwtEntry struct {
	token     string
	spiffeID  string
	expiresAt time.Time
	refreshAt time.Time
	staleBy   time.Time // past refreshAt, served only while the Workload API is unreachable, until this
}

// JWTSVID returns a JWT-SVID of the workload's default identity for audience, and its expiry.
// This is for credential providers (OAuth2 client assertions, STS web identity).
//
// A token is cached per audience until half its lifetime, measured from when the fetch started
// by the injected clock, has passed; then the next call fetches a new one. A cached token is
// also dropped when the X509-SVID's SPIFFE ID changes. Concurrent callers for one audience
// share a single fetch; ctx bounds only this caller's wait. Fetch failures wrap ErrUnavailable
// and are not cached.
//
// While the Workload API is unreachable (the SPIRE agent restarting: Unavailable or a timeout, not
// a refusal such as PermissionDenied), a token past its half-life is served until nine tenths of
// its lifetime, as the X509-SVID is served until it expires: a short agent outage must not fail
// every credential that needs a JWT-SVID. Every call still tries a fetch first, so the first
// one after the agent is back gets a fresh token.
//
// The token is a bearer credential: never log it or put it in an error.
func (s *SPIFFE) JWTSVID(ctx context.Context, audience string) (token string, expiresAt time.Time, err error) {
	if audience == "" {
		return "", time.Time{}, errors.New("attest: JWT-SVID audience must not be empty")
	}
	if s.closed.Load() {
		return "", time.Time{}, errClosed
	}
	if e, ok := s.cachedJWT(audience); ok {
		return e.token, e.expiresAt, nil
	}
	ch := s.jwtGroup.DoChan(audience, func() (any, error) { return s.fetchJWT(audience) })
	select {
	case r := <-ch:
		if r.Err != nil {
			return "", time.Time{}, r.Err
		}
		e := r.Val.(jwtEntry)
		return e.token, e.expiresAt, nil
	case <-ctx.Done():
		return "", time.Time{}, fmt.Errorf("attest: JWT-SVID for audience %q: %w", audience, ctx.Err())
	}
}

// cachedJWT returns the cached token for audience if it is still before its refresh time and
// belongs to the SPIFFE ID of the X509-SVID currently held.
func (s *SPIFFE) cachedJWT(audience string) (jwtEntry, bool) {
	s.jwtMu.Lock()
	e, ok := s.jwtCache[audience]
	s.jwtMu.Unlock()
	if !ok || !s.now().Before(e.refreshAt) {
		return jwtEntry{}, false
	}
	// Only for the identity currently held: after a rotation to another ID, or a revocation
	// (no SVID held), a cached token is not served.
	if cur := s.cur.Load(); cur == nil || cur.closed || cur.id != e.spiffeID {
		return jwtEntry{}, false
	}
	return e, true
}

// staleJWT returns the cached token for audience when the fetch failed only because the Workload
// API could not be reached, the token is before its staleBy time and it belongs to the identity
// currently held.
func (s *SPIFFE) staleJWT(audience string, fetchErr error) (jwtEntry, bool) {
	if c := status.Code(fetchErr); c != codes.Unavailable && c != codes.DeadlineExceeded {
		return jwtEntry{}, false
	}
	s.jwtMu.Lock()
	e, ok := s.jwtCache[audience]
	s.jwtMu.Unlock()
	if !ok || !s.now().Before(e.staleBy) {
		return jwtEntry{}, false
	}
	if cur := s.cur.Load(); cur == nil || cur.closed || cur.id != e.spiffeID {
		return jwtEntry{}, false
	}
	return e, true
}

func (s *SPIFFE) fetchJWT(audience string) (jwtEntry, error) {
	// A fetch for this audience may have finished between the caller's cache check and this
	// one starting; don't fetch again.
	if e, ok := s.cachedJWT(audience); ok {
		return e, nil
	}
	ctx, cancel := context.WithTimeout(s.ctx, jwtFetchTimeout)
	defer cancel()
	fetchedAt := s.now()
	svid, err := s.client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience})
	if err != nil {
		if s.closed.Load() {
			return jwtEntry{}, errClosed
		}
		if e, ok := s.staleJWT(audience, err); ok {
			s.log.Warn("Workload API unreachable; serving the previous JWT-SVID until it is near expiry",
				zap.String("audience", audience), zap.Time("expires_at", e.expiresAt), zap.Error(err))
			return e, nil
		}
		return jwtEntry{}, fmt.Errorf("%w: fetch JWT-SVID for audience %q: %w", ErrUnavailable, audience, err)
	}
	if !svid.Expiry.After(fetchedAt) {
		return jwtEntry{}, fmt.Errorf("%w: JWT-SVID for audience %q expired at %s", ErrUnavailable,
			audience, svid.Expiry.UTC().Format(time.RFC3339))
	}
	e := jwtEntry{
		token:     svid.Marshal(),
		spiffeID:  svid.ID.String(),
		expiresAt: svid.Expiry,
		refreshAt: fetchedAt.Add(svid.Expiry.Sub(fetchedAt) / 2),
		staleBy:   fetchedAt.Add(svid.Expiry.Sub(fetchedAt) * 9 / 10),
	}
	s.jwtMu.Lock()
	if !s.closed.Load() {
		now := s.now()
		for a, old := range s.jwtCache {
			if !now.Before(old.expiresAt) {
				delete(s.jwtCache, a)
			}
		}
		s.jwtCache[audience] = e
	}
	s.jwtMu.Unlock()
	return e, nil
}
