package egress

import (
	"errors"
	"net/netip"
	"testing"
)

func TestRules_DeniesByDefault(t *testing.T) {
	r := NewRules(RulesOptions{})
	cases := []struct {
		ip   string
		want Class
	}{
		{"127.0.0.1", ClassLoopback},
		{"127.255.255.254", ClassLoopback},
		{"::1", ClassLoopback},
		{"10.0.0.1", ClassPrivate},
		{"172.16.0.1", ClassPrivate},
		{"172.31.255.255", ClassPrivate},
		{"192.168.1.1", ClassPrivate},
		{"100.64.0.1", ClassCGNAT},
		{"100.127.255.255", ClassCGNAT},
		{"fc00::1", ClassULA},
		{"fd12:3456::1", ClassULA},
		{"169.254.1.1", ClassLinkLocal},
		{"fe80::1", ClassLinkLocal},
		{"169.254.169.254", ClassMetadata},
		{"169.254.170.2", ClassMetadata},
		{"169.254.170.23", ClassMetadata},
		{"fd00:ec2::254", ClassMetadata},
		{"fd00:ec2::23", ClassMetadata},
		{"100.100.100.200", ClassMetadata},
		{"168.63.129.16", ClassMetadata},
		{"0.0.0.0", ClassUnspecified},
		{"::", ClassUnspecified},
		{"0.1.2.3", ClassThisNetwork},
		{"224.0.0.1", ClassMulticast},
		{"239.255.255.250", ClassMulticast},
		{"ff02::1", ClassMulticast},
		{"ff0e::1", ClassMulticast},
		{"255.255.255.255", ClassBroadcast},
		{"240.0.0.1", ClassReserved},
		{"192.0.0.8", ClassReserved},
		{"192.88.99.1", ClassReserved},
		{"fec0::1", ClassReserved},
		{"192.0.2.1", ClassDocumentation},
		{"198.51.100.1", ClassDocumentation},
		{"203.0.113.1", ClassDocumentation},
		{"2001:db8::1", ClassDocumentation},
		{"3fff::1", ClassDocumentation},
		{"198.18.0.1", ClassBenchmarking},
		{"198.19.255.255", ClassBenchmarking},
		{"2001:2::1", ClassBenchmarking},
		{"2001:4:112::1", ClassReserved},
		{"100::1", ClassNotGlobal},       // discard-only
		{"5f00::1", ClassNotGlobal},      // SRv6 SIDs
		{"4000::1", ClassNotGlobal},      // unallocated, outside 2000::/3
		{"::2", ClassThisNetwork},        // IPv4-compatible ::0.0.0.2
		{"::808:808", ClassReserved},     // IPv4-compatible, public embedded: deprecated form
		{"::ffff:0:a00:1", ClassPrivate}, // IPv4-translated 10.0.0.1
		// IPv4-mapped.
		{"::ffff:169.254.169.254", ClassMetadata},
		{"::ffff:10.0.0.1", ClassPrivate},
		{"::ffff:127.0.0.1", ClassLoopback},
		{"::ffff:0.0.0.0", ClassUnspecified},
		// NAT64 well-known and local-use prefixes.
		{"64:ff9b::a9fe:a9fe", ClassMetadata},
		{"64:ff9b::7f00:1", ClassLoopback},
		{"64:ff9b::10.1.2.3", ClassPrivate},
		{"64:ff9b:1::a00:1", ClassPrivate}, // /96 position
		{"64:ff9b:1:a00:1::", ClassNotGlobal},
		{"64:ff9b:1::a9fe:a9fe", ClassMetadata},
		{"64:ff9b:1::808:808", ClassNotGlobal},
		// 6to4 and Teredo.
		{"2002:a9fe:a9fe::", ClassMetadata},
		{"2002:a00:1::1", ClassPrivate},
		{"2002:7f00:1::", ClassLoopback},
		{"2001:0:4136:e378:8000:63bf:f5ff:fffe", ClassPrivate}, // client ^f5fffffe = 10.0.0.1
		{"2001:0:a00:1:8000:63bf:f7f7:f7f7", ClassPrivate},     // server 10.0.0.1, client 8.8.8.8
	}
	for _, tc := range cases {
		t.Run(tc.ip, func(t *testing.T) {
			ip := netip.MustParseAddr(tc.ip)
			err := r.Check(ip, 443)
			var de *DeniedError
			if !errors.As(err, &de) {
				t.Fatalf("Check(%s) = %v, want *DeniedError", ip, err)
			}
			if de.Class != tc.want {
				t.Errorf("Check(%s) class = %q, want %q", ip, de.Class, tc.want)
			}
			if de.IP != ip {
				t.Errorf("DeniedError.IP = %s, want %s", de.IP, ip)
			}
		})
	}
}

func TestRules_ZoneInvalidPortInvalidAddr(t *testing.T) {
	r := NewRules(RulesOptions{AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("::/0"), netip.MustParsePrefix("0.0.0.0/0")}})
	for _, tc := range []struct {
		ip   netip.Addr
		port int
		want Class
	}{
		{netip.MustParseAddr("fe80::1%eth0"), 443, ClassZone},
		{netip.MustParseAddr("2606:4700::1111%eth0"), 443, ClassZone},
		{netip.Addr{}, 443, ClassInvalid},
		{netip.MustParseAddr("8.8.8.8"), 0, ClassInvalidPort},
		{netip.MustParseAddr("8.8.8.8"), 65536, ClassInvalidPort},
		{netip.MustParseAddr("8.8.8.8"), -1, ClassInvalidPort},
	} {
		var de *DeniedError
		if err := r.Check(tc.ip, tc.port); !errors.As(err, &de) || de.Class != tc.want {
			t.Errorf("Check(%v, %d) = %v, want class %q", tc.ip, tc.port, err, tc.want)
		}
	}
}

func TestRules_AllowsPublic(t *testing.T) {
	r := NewRules(RulesOptions{})
	for _, s := range []string{
		"8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.0", "172.32.0.1",
		"192.0.1.1", "198.20.0.1", "223.255.255.255", "169.253.255.255",
		"2606:4700::1111", "2001:4860:4860::8888", "2a00:1450:4001::1",
		"::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
	} {
		ip := netip.MustParseAddr(s)
		if err := r.Check(ip, 443); err != nil {
			t.Errorf("Check(%s) = %v, want nil", s, err)
		}
	}
}

func TestRules_AllowCIDRsOpenButSelfStaysDenied(t *testing.T) {
	r := newRules(RulesOptions{
		AllowCIDRs: []netip.Prefix{
			netip.MustParsePrefix("127.0.0.0/8"),
			netip.MustParsePrefix("10.0.0.0/8"),
		},
		Self: []netip.AddrPort{
			netip.MustParseAddrPort("127.0.0.1:15480"),
			netip.MustParseAddrPort("0.0.0.0:15481"),
		},
	}, func() []netip.Addr { return []netip.Addr{netip.MustParseAddr("10.1.2.3")} })

	allowed := []struct {
		ip   string
		port int
	}{
		{"127.0.0.1", 8080},
		{"127.0.0.2", 15480}, // a different address than the listener
		{"::ffff:127.0.0.1", 8080},
		{"10.9.9.9", 15481}, // not a local address
	}
	for _, tc := range allowed {
		if err := r.Check(netip.MustParseAddr(tc.ip), tc.port); err != nil {
			t.Errorf("Check(%s, %d) = %v, want nil", tc.ip, tc.port, err)
		}
	}
	self := []struct {
		ip   string
		port int
	}{
		{"127.0.0.1", 15480},
		{"::ffff:127.0.0.1", 15480},
		{"127.0.0.1", 15481}, // wildcard listener: every local address
		{"127.0.0.5", 15481},
		{"::1", 15481},
		{"10.1.2.3", 15481}, // interface address, opened by 10/8 but still self
	}
	for _, tc := range self {
		var de *DeniedError
		if err := r.Check(netip.MustParseAddr(tc.ip), tc.port); !errors.As(err, &de) || de.Class != ClassSelf {
			t.Errorf("Check(%s, %d) = %v, want class self", tc.ip, tc.port, err)
		}
	}
	// Still denied: not opened.
	if err := r.Check(netip.MustParseAddr("192.168.0.1"), 80); err == nil {
		t.Error("192.168.0.1 allowed, want denied")
	}
}

func TestRules_MetadataNeedsExactAllow(t *testing.T) {
	broad := NewRules(RulesOptions{AllowCIDRs: []netip.Prefix{
		netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0"),
	}})
	for _, s := range []string{"169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254", "169.254.170.23"} {
		var de *DeniedError
		if err := broad.Check(netip.MustParseAddr(s), 80); !errors.As(err, &de) || de.Class != ClassMetadata {
			t.Errorf("broad allow: Check(%s) = %v, want metadata", s, err)
		}
	}
	// Broad allows open everything else that is openable...
	if err := broad.Check(netip.MustParseAddr("169.254.1.1"), 80); err != nil {
		t.Errorf("169.254.1.1 with 0.0.0.0/0: %v", err)
	}
	// ...but never unspecified, multicast or broadcast.
	for _, s := range []string{"0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255", "64:ff9b::"} {
		if err := broad.Check(netip.MustParseAddr(s), 80); err == nil {
			t.Errorf("broad allow opened %s", s)
		}
	}

	exact := NewRules(RulesOptions{AllowCIDRs: []netip.Prefix{
		netip.MustParsePrefix("169.254.169.254/32"), netip.MustParsePrefix("fd00:ec2::254/128"),
	}})
	for _, s := range []string{"169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"} {
		if err := exact.Check(netip.MustParseAddr(s), 80); err != nil {
			t.Errorf("exact allow: Check(%s) = %v, want nil", s, err)
		}
	}
	if err := exact.Check(netip.MustParseAddr("169.254.170.2"), 80); err == nil {
		t.Error("169.254.170.2 opened by an allow of 169.254.169.254/32")
	}
}

func TestRules_EmbeddedFormsNeedTheirOwnAllow(t *testing.T) {
	r := NewRules(RulesOptions{AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}})
	if err := r.Check(netip.MustParseAddr("10.0.0.1"), 80); err != nil {
		t.Fatalf("10.0.0.1: %v", err)
	}
	if err := r.Check(netip.MustParseAddr("::ffff:10.0.0.1"), 80); err != nil {
		t.Errorf("mapped form of an allowed address: %v", err)
	}
	for _, s := range []string{"64:ff9b::a00:1", "2002:a00:1::"} {
		if err := r.Check(netip.MustParseAddr(s), 80); err == nil {
			t.Errorf("%s opened by 10.0.0.0/8", s)
		}
	}
	nat := NewRules(RulesOptions{AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("64:ff9b::a00:0/104")}})
	if err := nat.Check(netip.MustParseAddr("64:ff9b::a00:1"), 80); err != nil {
		t.Errorf("explicit NAT64 allow: %v", err)
	}
}

func TestDeniedError_Message(t *testing.T) {
	e := &DeniedError{Host: "x", IP: netip.MustParseAddr("10.0.0.1"), Class: ClassPrivate}
	if got, want := e.Error(), "egress: 10.0.0.1 (private) is not allowed for host x"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func FuzzRulesCheck(f *testing.F) {
	for _, s := range []string{"10.0.0.1", "169.254.169.254", "8.8.8.8", "::1", "fd00:ec2::254",
		"64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::", "2001:0:4136:e378:8000:63bf:f5ff:fffe", "2606:4700::1111"} {
		f.Add(netip.MustParseAddr(s).AsSlice(), uint16(443))
	}
	r := NewRules(RulesOptions{})
	nat64 := netip.MustParsePrefix("64:ff9b::/96")
	f.Fuzz(func(t *testing.T, b []byte, port uint16) {
		var ip netip.Addr
		switch {
		case len(b) >= 16:
			ip = netip.AddrFrom16([16]byte(b[:16]))
		case len(b) >= 4:
			ip = netip.AddrFrom4([4]byte(b[:4]))
		default:
			return
		}
		p := int(port%65535) + 1
		err := r.Check(ip, p)
		if err != nil {
			var de *DeniedError
			if !errors.As(err, &de) || de.Class == "" {
				t.Fatalf("Check(%s) = %v: not a classified *DeniedError", ip, err)
			}
		} else if !ip.Unmap().IsGlobalUnicast() || ip.IsPrivate() || ip.Unmap().IsPrivate() {
			t.Fatalf("Check(%s) allowed a non-global or private address", ip)
		}
		v4 := ip.Unmap()
		if !v4.Is4() {
			return
		}
		// A v4 address, its mapped form and (when denied) its NAT64 form agree.
		err4 := r.Check(v4, p)
		errMapped := r.Check(netip.AddrFrom16(v4.As16()), p)
		if (err4 == nil) != (errMapped == nil) {
			t.Fatalf("%s: v4 %v, mapped %v", v4, err4, errMapped)
		}
		if err4 != nil {
			var a, b *DeniedError
			errors.As(err4, &a)
			errors.As(errMapped, &b)
			if a.Class != b.Class {
				t.Fatalf("%s: v4 class %q, mapped class %q", v4, a.Class, b.Class)
			}
			b16 := nat64.Addr().As16()
			v := v4.As4()
			copy(b16[12:], v[:])
			if r.Check(netip.AddrFrom16(b16), p) == nil {
				t.Fatalf("%s denied but its NAT64 form is allowed", v4)
			}
		}
	})
}
