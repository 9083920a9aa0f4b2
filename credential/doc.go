// Package credential resolves the secret a route needs and applies it to an outbound request.
//
// The three parts:
//
//   - Token: one credential instance. Its value is unexported and every formatting path
//     (fmt verbs, String, GoString, JSON, text, zap, slog) prints only its name and instance ID,
//     so a %v in a log line, an error or a panic cannot leak it.
//   - Provider and Manager: a Provider fetches a fresh Token (StaticFile, StaticEnv; OAuth2, STS,
//     GitHub App and Vault later). The Manager caches one Token per name, makes one upstream fetch
//     per name however many requests wait, refreshes expiring tokens ahead of expiry, re-checks
//     file-backed secrets for rotation, and wraps every failure in ErrUnavailable.
//   - Applier: strips whatever credential the agent sent and sets the real one (header template,
//     HTTP basic auth or query parameter), precompiled once per route.
//
// The package runs no servers and imports nothing of the proxy or config: the proxy translates
// its configuration into Provider values and ApplySpec.
package credential
