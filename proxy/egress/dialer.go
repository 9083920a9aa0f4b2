package egress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"
)

// DefaultTimeout bounds resolve+connect when DialerOptions.Timeout is zero.
const DefaultTimeout = 10 * time.Second

// minAttempt is the least time one address gets when several share the timeout.
const minAttempt = 2 * time.Second

// Resolver looks up a host's addresses. *net.Resolver satisfies it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// DialerOptions configures NewDialer.
type DialerOptions struct {
	// Rules decides which addresses may be dialled; nil means NewRules(RulesOptions{}), the
	// defaults, never "allow everything".
	Rules *Rules
	// Resolver resolves names; nil means net.DefaultResolver.
	Resolver Resolver
	// Dial connects to a checked ip:port; nil means (&net.Dialer{}).DialContext.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Timeout bounds resolve+connect together; zero means DefaultTimeout, negative means only
	// the caller's context bounds it.
	Timeout time.Duration
}

// Dialer resolves a name once, checks every answer against its Rules and connects only to a
// checked IP address. It is safe for concurrent use.
type Dialer struct {
	rules    *Rules
	resolver Resolver
	dial     func(ctx context.Context, network, addr string) (net.Conn, error)
	timeout  time.Duration
}

// NewDialer returns a Dialer.
func NewDialer(o DialerOptions) *Dialer {
	d := &Dialer{rules: o.Rules, resolver: o.Resolver, dial: o.Dial, timeout: o.Timeout}
	if d.rules == nil {
		d.rules = NewRules(RulesOptions{})
	}
	if d.resolver == nil {
		d.resolver = net.DefaultResolver
	}
	if d.dial == nil {
		d.dial = (&net.Dialer{}).DialContext
	}
	if d.timeout == 0 {
		d.timeout = DefaultTimeout
	}
	return d
}

// DialContext connects to addr ("host:port", numeric port) over network "tcp", "tcp4" or
// "tcp6". A literal IP is checked and dialled; a name is resolved once and the checked answers
// are tried in order until one connects. If no answer may be dialled, the error is the
// *DeniedError of the first denied answer. It is usable as http.Transport.DialContext (TLS
// verification still uses the request's host name, not the dialled IP).
//
// Errors are prefixed "egress: " and wrap their cause.
func (d *Dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var lookupNet string
	switch network {
	case "tcp":
		lookupNet = "ip"
	case "tcp4":
		lookupNet = "ip4"
	case "tcp6":
		lookupNet = "ip6"
	default:
		return nil, fmt.Errorf("egress: network %q not supported", network)
	}
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("egress: %w", err)
	}
	if host == "" {
		return nil, fmt.Errorf("egress: no host in %q", addr)
	}
	port64, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port64 == 0 {
		return nil, fmt.Errorf("egress: invalid port %q in %q", portStr, addr)
	}
	port := uint16(port64)

	if d.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d.timeout)
		defer cancel()
	}

	var answers []netip.Addr
	if ip, perr := netip.ParseAddr(host); perr == nil {
		answers = []netip.Addr{ip}
	} else {
		answers, err = d.resolver.LookupNetIP(ctx, lookupNet, host)
		if err != nil {
			return nil, fmt.Errorf("egress: resolve %s: %w", host, err)
		}
		if len(answers) == 0 {
			return nil, fmt.Errorf("egress: resolve %s: no addresses", host)
		}
	}

	var firstDenied *DeniedError
	checked := make([]netip.Addr, 0, len(answers))
	for _, a := range answers {
		if err := d.rules.Check(a, int(port)); err != nil {
			var de *DeniedError
			if firstDenied == nil && errors.As(err, &de) {
				cp := *de
				cp.Host = host
				firstDenied = &cp
			}
			continue
		}
		a = a.Unmap()
		if (network == "tcp4" && !a.Is4()) || (network == "tcp6" && !a.Is6()) {
			continue
		}
		checked = append(checked, a)
	}
	if len(checked) == 0 {
		if firstDenied != nil {
			return nil, firstDenied
		}
		return nil, fmt.Errorf("egress: no %s address for %s", network, host)
	}

	var errs []error
	for i, a := range checked {
		if err := ctx.Err(); err != nil {
			errs = append(errs, err)
			break
		}
		conn, err := d.dialOne(ctx, network, netip.AddrPortFrom(a, port), len(checked)-i)
		if err == nil {
			return conn, nil
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("egress: dial %s: %w", host, errors.Join(errs...))
}

// dialOne dials ap, giving it a fair share of the remaining time when left addresses (this one
// included) share the deadline, so one black-holed address cannot use all of it.
func (d *Dialer) dialOne(ctx context.Context, network string, ap netip.AddrPort, left int) (net.Conn, error) {
	if deadline, ok := ctx.Deadline(); ok && left > 1 {
		share := time.Until(deadline) / time.Duration(left)
		if share < minAttempt {
			share = minAttempt
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, share)
		defer cancel()
	}
	return d.dial(ctx, network, ap.String())
}
