// Package egress decides which upstream IP addresses escrow may connect to, and dials only
// addresses it has checked.
//
// The rule is "global unicast only": every address that is not plainly routable on the public
// Internet is denied unless the operator opens it with an allow CIDR. The reason a destination
// was refused is a stable [Class] string, meant for audit records and metric labels.
//
// [Dialer] resolves a name once, checks every answer and dials one of the checked IP addresses,
// never the name again, so a DNS answer that changes between check and connect (DNS rebinding)
// cannot move a connection to a denied address.
//
// Decisions worth knowing (see [Rules.Check] for the order):
//   - Documentation (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32, 3fff::/20)
//     and benchmarking (198.18.0.0/15, 2001:2::/48) ranges are denied as "documentation" and
//     "benchmarking": nothing real lives there.
//   - Cloud metadata and credential endpoints (169.254.169.254, 169.254.170.2 ECS,
//     169.254.170.23 and fd00:ec2::23 EKS Pod Identity, fd00:ec2::254, 100.100.100.200 Alibaba,
//     168.63.129.16 Azure WireServer) are "metadata". An allow CIDR opens a metadata address only
//     when it names exactly that one address (a /32 or /128): opening 169.254.0.0/16 or
//     0.0.0.0/0 does not open the instance's credentials.
//   - IPv6 forms that embed an IPv4 address (IPv4-mapped, IPv4-compatible, IPv4-translated,
//     NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo 2001::/32 (client and server)) are classified
//     by the embedded address. IPv4-mapped addresses are checked exactly as their IPv4 form (allow
//     CIDRs included); for the other forms an allow CIDR must contain the IPv6 address as
//     written, so opening 10.0.0.0/8 does not open 64:ff9b::a00:1. IPv4-compatible and
//     IPv4-translated addresses are deprecated and denied even when the embedded address is
//     public ("reserved" then). The local-use NAT64 prefix 64:ff9b:1::/48 is not globally reachable
//     and its layout is the operator's choice: it is denied ("not_global", or the class of
//     the /96 reading when that is denied) unless an allow CIDR opens it.
//   - Unspecified, multicast and broadcast addresses, addresses with an IPv6 zone, and escrow's
//     own listeners (Self) are never opened by an allow CIDR.
//   - Network-specific NAT64 prefixes (RFC 6052 prefixes out of an operator's own global space)
//     cannot be recognised and are treated as the global IPv6 addresses they are.
package egress

import (
	"fmt"
	"net"
	"net/netip"
)

// Class is the stable reason an address was denied.
type Class string

// Classes of denied addresses.
const (
	ClassInvalid       Class = "invalid"       // the zero netip.Addr
	ClassInvalidPort   Class = "invalid_port"  // port outside 1..65535
	ClassZone          Class = "zone"          // an IPv6 address with a zone, e.g. fe80::1%eth0
	ClassSelf          Class = "self"          // one of escrow's own listeners
	ClassUnspecified   Class = "unspecified"   // 0.0.0.0, ::
	ClassThisNetwork   Class = "this_network"  // 0.0.0.0/8
	ClassLoopback      Class = "loopback"      // 127.0.0.0/8, ::1
	ClassPrivate       Class = "private"       // RFC 1918
	ClassCGNAT         Class = "cgnat"         // 100.64.0.0/10
	ClassULA           Class = "ula"           // fc00::/7
	ClassLinkLocal     Class = "link_local"    // 169.254.0.0/16, fe80::/10
	ClassMetadata      Class = "metadata"      // cloud instance metadata / credential endpoints
	ClassMulticast     Class = "multicast"     // 224.0.0.0/4, ff00::/8
	ClassBroadcast     Class = "broadcast"     // 255.255.255.255
	ClassReserved      Class = "reserved"      // 240.0.0.0/4, IETF protocol assignments, deprecated forms
	ClassDocumentation Class = "documentation" // TEST-NET-1/2/3, 2001:db8::/32, 3fff::/20
	ClassBenchmarking  Class = "benchmarking"  // 198.18.0.0/15, 2001:2::/48
	ClassNotGlobal     Class = "not_global"    // anything else that is not global unicast
)

// DeniedError reports an address the rules refuse. Use errors.As to get it from a dial error.
type DeniedError struct {
	// Host is the name or literal the caller asked for; empty when it came from Rules.Check.
	Host string
	// IP is the refused address, as checked.
	IP netip.Addr
	// Class is why it was refused.
	Class Class
}

func (e *DeniedError) Error() string {
	if e.Host == "" {
		return fmt.Sprintf("egress: %s (%s) is not allowed", e.IP, e.Class)
	}
	return fmt.Sprintf("egress: %s (%s) is not allowed for host %s", e.IP, e.Class, e.Host)
}

// RulesOptions configures NewRules.
type RulesOptions struct {
	// AllowCIDRs opens ranges that are denied by default (an internal API's 10.0.0.0/8,
	// 127.0.0.0/8 in tests). A CIDR matches the address as given and, for an IPv4-mapped
	// address, its IPv4 form. See the package documentation for what it cannot open.
	AllowCIDRs []netip.Prefix
	// Self lists escrow's own listeners. A connection to one of them is always denied (it would
	// loop through the proxy), whatever AllowCIDRs says. 0.0.0.0:P and [::]:P mean every local
	// address on port P: loopback, unspecified, and the addresses of this host's interfaces as
	// they were when NewRules ran.
	Self []netip.AddrPort
}

// Rules decides whether escrow may connect to an address. It is immutable and safe for
// concurrent use.
type Rules struct {
	allow         []netip.Prefix
	selfExact     map[netip.AddrPort]struct{}
	selfWildPorts map[uint16]struct{}
	localAddrs    map[netip.Addr]struct{}
}

// NewRules builds the rules. Invalid prefixes and addresses in o are ignored.
func NewRules(o RulesOptions) *Rules {
	return newRules(o, interfaceAddrs)
}

func newRules(o RulesOptions, local func() []netip.Addr) *Rules {
	r := &Rules{
		selfExact:     make(map[netip.AddrPort]struct{}),
		selfWildPorts: make(map[uint16]struct{}),
		localAddrs:    make(map[netip.Addr]struct{}),
	}
	for _, p := range o.AllowCIDRs {
		if p.IsValid() {
			r.allow = append(r.allow, p.Masked())
		}
	}
	for _, s := range o.Self {
		if !s.IsValid() || s.Port() == 0 {
			continue
		}
		a := s.Addr().Unmap().WithZone("")
		if a.IsUnspecified() {
			r.selfWildPorts[s.Port()] = struct{}{}
			continue
		}
		r.selfExact[netip.AddrPortFrom(a, s.Port())] = struct{}{}
	}
	if len(r.selfWildPorts) > 0 && local != nil {
		for _, a := range local() {
			r.localAddrs[a.Unmap().WithZone("")] = struct{}{}
		}
	}
	return r
}

// interfaceAddrs returns this host's interface addresses; an error yields none (loopback and
// unspecified are covered without it).
func interfaceAddrs() []netip.Addr {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range addrs {
		var ip net.IP
		switch v := a.(type) {
		case *net.IPNet:
			ip = v.IP
		case *net.IPAddr:
			ip = v.IP
		}
		if na, ok := netip.AddrFromSlice(ip); ok {
			out = append(out, na)
		}
	}
	return out
}

// Check returns nil if escrow may connect to ip:port, or a *DeniedError.
//
// Order: invalid address or port, a zone, Self (never openable), then the address class; a
// denied class is opened by an allow CIDR unless it is unspecified, multicast or broadcast, and
// a metadata address only by an allow CIDR of exactly that address.
func (r *Rules) Check(ip netip.Addr, port int) error {
	deny := func(c Class) error { return &DeniedError{IP: ip, Class: c} }
	switch {
	case !ip.IsValid():
		return deny(ClassInvalid)
	case port < 1 || port > 65535:
		return deny(ClassInvalidPort)
	case ip.Zone() != "":
		return deny(ClassZone)
	}
	a := ip.Unmap()
	if r.isSelf(a, uint16(port)) {
		return deny(ClassSelf)
	}
	c := classify(a)
	if c == "" || r.opens(ip, a, c) {
		return nil
	}
	return deny(c)
}

func (r *Rules) isSelf(a netip.Addr, port uint16) bool {
	if _, ok := r.selfExact[netip.AddrPortFrom(a, port)]; ok {
		return true
	}
	if _, ok := r.selfWildPorts[port]; !ok {
		return false
	}
	if a.IsLoopback() || a.IsUnspecified() {
		return true
	}
	_, ok := r.localAddrs[a]
	return ok
}

func (r *Rules) opens(ip, a netip.Addr, c Class) bool {
	switch c {
	case ClassUnspecified, ClassMulticast, ClassBroadcast:
		return false
	}
	for _, p := range r.allow {
		if c == ClassMetadata && !p.IsSingleIP() {
			continue
		}
		if p.Contains(ip) || p.Contains(a) {
			return true
		}
	}
	return false
}

type classRange struct {
	p netip.Prefix
	c Class
}

// v4Ranges is searched in order; more specific prefixes come before the ranges containing them.
var v4Ranges = []classRange{
	{netip.MustParsePrefix("0.0.0.0/32"), ClassUnspecified},
	{netip.MustParsePrefix("0.0.0.0/8"), ClassThisNetwork},
	{netip.MustParsePrefix("10.0.0.0/8"), ClassPrivate},
	{netip.MustParsePrefix("100.100.100.200/32"), ClassMetadata}, // Alibaba Cloud
	{netip.MustParsePrefix("100.64.0.0/10"), ClassCGNAT},
	{netip.MustParsePrefix("127.0.0.0/8"), ClassLoopback},
	{netip.MustParsePrefix("168.63.129.16/32"), ClassMetadata},   // Azure WireServer
	{netip.MustParsePrefix("169.254.169.254/32"), ClassMetadata}, // AWS, GCP, Azure, OCI, ...
	{netip.MustParsePrefix("169.254.170.2/32"), ClassMetadata},   // ECS task credentials
	{netip.MustParsePrefix("169.254.170.23/32"), ClassMetadata},  // EKS Pod Identity agent
	{netip.MustParsePrefix("169.254.0.0/16"), ClassLinkLocal},
	{netip.MustParsePrefix("172.16.0.0/12"), ClassPrivate},
	{netip.MustParsePrefix("192.0.0.0/24"), ClassReserved}, // IETF protocol assignments
	{netip.MustParsePrefix("192.0.2.0/24"), ClassDocumentation},
	{netip.MustParsePrefix("192.88.99.0/24"), ClassReserved}, // deprecated 6to4 relay anycast
	{netip.MustParsePrefix("192.168.0.0/16"), ClassPrivate},
	{netip.MustParsePrefix("198.18.0.0/15"), ClassBenchmarking},
	{netip.MustParsePrefix("198.51.100.0/24"), ClassDocumentation},
	{netip.MustParsePrefix("203.0.113.0/24"), ClassDocumentation},
	{netip.MustParsePrefix("224.0.0.0/4"), ClassMulticast},
	{netip.MustParsePrefix("255.255.255.255/32"), ClassBroadcast},
	{netip.MustParsePrefix("240.0.0.0/4"), ClassReserved},
}

// v6Ranges is searched in order after the embedded-IPv4 forms have been handled.
var v6Ranges = []classRange{
	{netip.MustParsePrefix("::/128"), ClassUnspecified},
	{netip.MustParsePrefix("::1/128"), ClassLoopback},
	{netip.MustParsePrefix("fd00:ec2::254/128"), ClassMetadata}, // AWS IMDS over IPv6
	{netip.MustParsePrefix("fd00:ec2::23/128"), ClassMetadata},  // EKS Pod Identity agent
	{netip.MustParsePrefix("ff00::/8"), ClassMulticast},
	{netip.MustParsePrefix("fe80::/10"), ClassLinkLocal},
	{netip.MustParsePrefix("fec0::/10"), ClassReserved}, // deprecated site-local
	{netip.MustParsePrefix("fc00::/7"), ClassULA},
	{netip.MustParsePrefix("2001:2::/48"), ClassBenchmarking},
	{netip.MustParsePrefix("2001::/23"), ClassReserved}, // IETF protocol assignments (after Teredo)
	{netip.MustParsePrefix("2001:db8::/32"), ClassDocumentation},
	{netip.MustParsePrefix("3fff::/20"), ClassDocumentation},
}

var (
	globalUnicast6 = netip.MustParsePrefix("2000::/3")
	nat64WKP       = netip.MustParsePrefix("64:ff9b::/96")
	nat64Local     = netip.MustParsePrefix("64:ff9b:1::/48")
	v4Compatible   = netip.MustParsePrefix("::/96")
	v4Translated   = netip.MustParsePrefix("::ffff:0:0:0/96")
	sixToFour      = netip.MustParsePrefix("2002::/16")
	teredo         = netip.MustParsePrefix("2001::/32")
)

// classify returns the class of a (already unmapped, no zone), or "" when it is global unicast.
func classify(a netip.Addr) Class {
	if a.Is4() {
		return classify4(a)
	}
	return classify6(a)
}

func classify4(a netip.Addr) Class {
	for _, r := range v4Ranges {
		if r.p.Contains(a) {
			return r.c
		}
	}
	if !a.IsGlobalUnicast() { // defensive: the table should cover everything
		return ClassNotGlobal
	}
	return ""
}

func classify6(a netip.Addr) Class {
	b := a.As16()
	switch {
	case a.IsUnspecified():
		return ClassUnspecified
	case a.IsLoopback():
		return ClassLoopback
	case nat64WKP.Contains(a):
		return classify4(v4At(b, 12, 13, 14, 15))
	case nat64Local.Contains(a):
		// Local-use NAT64 (RFC 8215) is not globally reachable, and where the IPv4 address
		// sits depends on the operator's prefix length. Denied unless an allow CIDR opens it;
		// reported by the /96 reading when that is a denied (but openable) address, so a
		// metadata address still needs an exact allow.
		switch c := classify4(v4At(b, 12, 13, 14, 15)); c {
		case "", ClassUnspecified, ClassMulticast, ClassBroadcast:
			return ClassNotGlobal
		default:
			return c
		}
	case v4Compatible.Contains(a), v4Translated.Contains(a):
		if c := classify4(v4At(b, 12, 13, 14, 15)); c != "" {
			return c
		}
		return ClassReserved
	case sixToFour.Contains(a):
		return classify4(v4At(b, 2, 3, 4, 5))
	case teredo.Contains(a):
		// Client address (obfuscated, last 32 bits) first: it is where the packets go.
		client := netip.AddrFrom4([4]byte{^b[12], ^b[13], ^b[14], ^b[15]})
		if c := classify4(client); c != "" {
			return c
		}
		return classify4(v4At(b, 4, 5, 6, 7)) // the Teredo server
	}
	for _, r := range v6Ranges {
		if r.p.Contains(a) {
			return r.c
		}
	}
	if !globalUnicast6.Contains(a) {
		return ClassNotGlobal
	}
	return ""
}

func v4At(b [16]byte, i, j, k, l int) netip.Addr {
	return netip.AddrFrom4([4]byte{b[i], b[j], b[k], b[l]})
}
