// Package scrub keeps an injected secret from flowing back to the agent: it finds the values
// escrow put on a request in the upstream's response headers and body and replaces them.
//
// escrow knows the exact value it injected, so it can look for it. An upstream reflects it
// more often than one would think: a redirect's Location or an error page quoting the URL
// carries a query-parameter credential, an echo endpoint returns the Authorization header.
//
// # What is guaranteed
//
// For a Scrubber built with New from values of at least MinLen bytes, and output produced by
// String, Header or Body:
//
//   - The output never contains any searched form of any value (the value itself, its
//     URL-escaped, base64, hex, JSON- and HTML-escaped forms: see New), compared ASCII
//     case-insensitively, nor the first PrefixLen bytes of one (a value cut short is replaced
//     as far as it goes), in a header value, a header name (such a header is removed), or the
//     scanned part of a body. A replacement can not combine with its neighbours into a
//     form either: each starts and ends with a byte no form contains (unless Weak).
//   - Every occurrence is replaced by the same number of bytes (Marker, cut short or padded),
//     so the body's length is unchanged: a Content-Length stays true and need not be removed,
//     HEAD and fixed-length responses keep their framing.
//   - A body is scanned as it streams. A match split across reads is found; bytes are held
//     back only while they could still be part of a match (at most MaxMatchLen bytes),
//     so a Server-Sent Event that ends in a line break reaches the agent without waiting for
//     the next one.
//   - In a body, every occurrence that begins within the first BodyOptions.Limit bytes
//     (DefaultLimit, 1 MiB) is replaced.
//
// # What is not
//
//   - Bytes after the scan window (Limit plus MaxMatchLen-1 bytes) pass unscanned, and
//     BodyResult.Unscanned says so.
//   - Compressed bodies (Content-Encoding other than identity) cannot be scanned: the caller
//     must ask the upstream for identity encoding on scrubbed routes (Accept-Encoding:
//     identity; an absent Accept-Encoding means any coding is acceptable) and refuse, or
//     decode, a response that is encoded anyway.
//   - Types that Scrubbable rejects (images, archives, octet streams, protobuf...) and
//     charsets that are not ASCII-compatible (UTF-16) are not scanned.
//   - Values shorter than MinLen are not searched (Ignored counts them).
//   - Pieces: a value reflected in parts (two Range responses, a paginated echo, the first
//     half in one header and the rest in another) or transformed in a way not listed (reversed,
//     another encoding, the value inside a base64 text but shifted by a partial character at
//     its edges, which may leave up to 6 bits of the first and last byte) is not recognised.
//     Callers should not forward Range requests on scrubbed routes.
//   - Upgraded connections (WebSocket after a 101) and tunnels are byte streams that are not
//     scanned; the 101's own headers are.
//   - A replaced body no longer matches validators and digests computed upstream (ETag,
//     Content-Digest, Content-MD5); only a response that contained a secret is affected.
//
// # Wiring it into a reverse proxy
//
// wiring_test.go is a working reference (httputil.ReverseProxy, real Go and curl clients):
//
//   - Build one Scrubber per credential value, not per request (Memo): New costs far more
//     than scrubbing a response. Pass the injected value; for Basic authentication also
//     BasicPair(user, password).
//   - Before sending: PrepareRequest (Accept-Encoding: identity; no Range, If-Range).
//   - In ModifyResponse: Header on the response headers; PlanBody; when it says
//     ReasonEncoded, fail closed (refuse with 502 rather than pass an unscanned body); when it
//     says Scan, wrap the body with Body and record BodyResult in OnDone (a metric and a flag
//     on the audit record, never the value).
//   - Leave Content-Length alone: replacements keep the length.
//   - 1xx responses (103 Early Hints carries Link headers) are copied to the client by
//     httputil.ReverseProxy without ModifyResponse: scrub the ResponseWriter's headers in
//     WriteHeader when the code is below 200.
//   - Trailers are filled in when the body ends: call Header on the response's Trailer at EOF.
//
// The package imports only the standard library.
package scrub
