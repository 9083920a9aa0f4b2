// Package credential resolves the secret a route needs and applies it to an outbound request.
//
// The parts:
//
//   - Token: one credential instance, a single value or several named parts (an access key id,
//     a secret key, a session token). Its secret is unexported and every formatting path (fmt
//     verbs, String, GoString, JSON, text, zap, slog) prints only its name and instance ID, so
//     a %v in a log line, an error or a panic cannot leak it.
//   - Provider: fetches a fresh Token for a (Name, Subject, Scope) key (StaticFile, StaticEnv;
//     OAuth2, token exchange, STS, GitHub App and Vault later). NewProvider is the one switch
//     from a config.Credential to a Provider; Deps is everything a provider may use (the egress
//     HTTP client, the pod's JWT-SVIDs as a JWTSource, the environment, the clock).
//   - Manager: caches tokens per (Name, Subject, Scope), or per name for a provider whose token
//     does not depend on the caller (Shared), makes one upstream fetch per key however many
//     requests wait, refreshes expiring tokens ahead of expiry, re-checks file-backed secrets for
//     rotation, wraps every failure in ErrUnavailable, and swaps its whole set of credentials
//     atomically (Update).
//   - Applier: strips whatever credential the agent sent and sets the real one (header template,
//     HTTP basic auth or query parameter; request signing later), built once per route from a
//     validated config.Injection. Apply can fail; a failure means "do not send".
//
// The package runs no servers and imports nothing of ours but config.
package credential
