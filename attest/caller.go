package attest

// Process is the calling process inside the pod, found from the kernel for the connection a
// request arrived on (the loopback socket's owner, or SO_PEERCRED on a Unix socket). It is
// attested by the kernel, not asserted by the caller. Policy sees it as context.caller.
type Process struct {
	PID int
	UID uint32
	GID uint32
	// Exe is the executable's path as the kernel reports it (/proc/<pid>/exe).
	Exe string
	// SHA256 is the hex sha256 of the executable's content; "" when it could not be read.
	SHA256 string
	// StartTime is the process start time in clock ticks since boot (field 22 of
	// /proc/<pid>/stat), which guards against pid reuse.
	StartTime uint64
}

// Delegation is a verified delegation chain: whom the caller acts for, read from a token the
// agent presented (RFC 8693 nested "act" claims). It is verified cryptographically but asserted
// by its issuer. Policy sees it as context.delegation.
type Delegation struct {
	// Subject is the token's sub: the party on whose behalf the call is made.
	Subject string
	// Actors are the acting parties, nearest (the direct caller) first; len(Actors) is the depth.
	Actors []string
	// Issuer is the token's iss.
	Issuer string
	// TokenID identifies the token in audit records without its value: its jti, or else
	// "sha256:" and the first 16 hex digits of its hash.
	TokenID string
}
