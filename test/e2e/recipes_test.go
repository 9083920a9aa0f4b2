package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The README's "Point an agent at it" section is run as written: its environment block (with
// the default proxy address and ca_dir replaced by this escrow's) is sourced by bash, then each
// client calls an https upstream through escrow with no credential of its own, and the upstream
// answers only to the credential escrow injects.

// undiciVersion is the undici the Node recipe installs (npm), for Node before 22.21.
const undiciVersion = "7.30.2"

// readmeRecipes are the fenced blocks of the README's "Point an agent at it" section.
type readmeRecipes struct {
	env  string // the first ```sh block: the agent's environment
	node string // the first ```js block: undici's global dispatcher for Node before 22.21
}

func loadReadmeRecipes(t *testing.T) readmeRecipes {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(moduleRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "\n## Point an agent at it\n")
	if i < 0 {
		t.Fatal(`README.md has no "## Point an agent at it" section`)
	}
	s = s[i+1:]
	if j := strings.Index(s[3:], "\n## "); j >= 0 {
		s = s[:j+3]
	}
	block := func(lang string) string {
		m := regexp.MustCompile("(?s)\n```" + lang + "\n(.*?)\n```\n").FindStringSubmatch(s)
		if m == nil {
			t.Fatalf("README's \"Point an agent at it\" has no ```%s block", lang)
		}
		return m[1]
	}
	return readmeRecipes{env: block("sh"), node: block("js")}
}

// recipeEnv is the README's environment block for this escrow: the default listen address and
// ca_dir replaced by the test's.
func (r readmeRecipes) recipeEnv(t *testing.T, e *escrow) string {
	t.Helper()
	env := r.env
	for _, want := range []string{"127.0.0.1:15480", "/var/run/escrow/"} {
		if !strings.Contains(env, want) {
			t.Fatalf("README's environment block no longer mentions %s:\n%s", want, env)
		}
	}
	env = strings.ReplaceAll(env, "127.0.0.1:15480", e.ProxyHP)
	return strings.ReplaceAll(env, "/var/run/escrow/", e.CADir+"/")
}

// recipeBaseEnv is the environment a recipe starts from: this process's without any proxy,
// CA-bundle or Node setting (the machine may preset them), so only the README's lines count.
func recipeBaseEnv(extra ...string) []string {
	drop := map[string]bool{
		"HTTP_PROXY": true, "HTTPS_PROXY": true, "ALL_PROXY": true, "NO_PROXY": true,
		"SSL_CERT_FILE": true, "SSL_CERT_DIR": true, "REQUESTS_CA_BUNDLE": true, "CURL_CA_BUNDLE": true,
		"GIT_SSL_CAINFO": true, "GIT_SSL_CAPATH": true, "NODE_EXTRA_CA_CERTS": true, "AWS_CA_BUNDLE": true,
		"NODE_USE_ENV_PROXY": true, "NODE_OPTIONS": true, "SPIFFE_ENDPOINT_SOCKET": true, "CURL_HOME": true,
		"GIT_CONFIG_GLOBAL": true, "GIT_CONFIG_SYSTEM": true,
	}
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if drop[strings.ToUpper(k)] || k == envSecretVar {
			continue
		}
		env = append(env, kv)
	}
	// git must never ask for a password on a terminal, nor read the machine's git config.
	env = append(env, "GIT_TERMINAL_PROMPT=0", "GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null")
	return append(env, extra...)
}

// runRecipe runs script in bash after the README's environment block.
func runRecipe(t *testing.T, e *escrow, envBlock, script string, extraEnv ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-euo", "pipefail", "-c", envBlock+"\n"+script)
	cmd.Env = recipeBaseEnv(extraEnv...)
	cmd.Dir = t.TempDir()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	e.Rec.add(t.Name()+": client output", out.Bytes())
	return out.String(), err
}

// gitServer is git's smart HTTP server (git http-backend behind Go's CGI handler) over TLS, for
// one bare repository. Like a forge, it answers 401 unless the request carries HTTP basic auth
// with the expected password.
type gitServer struct {
	Addr string
	// file and content are in the repository's only commit.
	file, content string
}

func startGitServer(t *testing.T, user, password string) *gitServer {
	t.Helper()
	out, err := exec.Command("git", "--exec-path").Output()
	if err != nil {
		t.Fatalf("git --exec-path: %v", err)
	}
	backend := filepath.Join(strings.TrimSpace(string(out)), "git-http-backend")
	root := t.TempDir()
	work := t.TempDir()
	g := &gitServer{file: "README", content: "escrow recipe " + randomHex(4) + "\n"}
	git := func(dir string, args ...string) {
		t.Helper()
		cmd := exec.Command("git", append([]string{"-c", "user.name=escrow e2e", "-c", "user.email=e2e@example.test",
			"-c", "init.defaultBranch=main"}, args...)...)
		cmd.Dir = dir
		cmd.Env = recipeBaseEnv()
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	git(root, "init", "-q", "--bare", "repo.git")
	git(work, "init", "-q")
	if err := os.WriteFile(filepath.Join(work, g.file), []byte(g.content), 0o644); err != nil {
		t.Fatal(err)
	}
	git(work, "add", g.file)
	git(work, "commit", "-q", "-m", "first")
	git(work, "push", "-q", filepath.Join(root, "repo.git"), "HEAD:refs/heads/main")

	h := &cgi.Handler{Path: backend, Env: []string{"GIT_PROJECT_ROOT=" + root, "GIT_HTTP_EXPORT_ALL=1"}}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != user || p != password {
			w.Header().Set("WWW-Authenticate", `Basic realm="git"`)
			http.Error(w, "authentication required", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{upstreamCA.leaf}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	g.Addr = srv.Listener.Addr().String()
	return g
}

// undiciDir returns a directory whose node_modules holds undici (installed once with npm into
// the user's cache), or "" and why not.
func undiciDir() (string, string) {
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", err.Error()
	}
	dir := filepath.Join(cache, "escrow-e2e", "undici-"+undiciVersion)
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "undici", "package.json")); err == nil {
		return dir, ""
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err.Error()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// npm needs the machine's own settings (registry, its proxy): the unfiltered environment.
	cmd := exec.CommandContext(ctx, "npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix", dir, "undici@"+undiciVersion)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Sprintf("npm install undici@%s: %v: %s", undiciVersion, err, lastLine(string(out)))
	}
	return dir, ""
}

// nodeVersion returns node's major and minor version.
func nodeVersion() (major, minor int, err error) {
	out, err := exec.Command("node", "-p", "process.versions.node").Output()
	if err != nil {
		return 0, 0, err
	}
	parts := strings.Split(strings.TrimSpace(string(out)), ".")
	if len(parts) < 2 {
		return 0, 0, fmt.Errorf("node version %q", out)
	}
	major, _ = strconv.Atoi(parts[0])
	minor, _ = strconv.Atoi(parts[1])
	return major, minor, nil
}

// requireTool skips (or, with ESCROW_E2E_REQUIRE_CLIENTS=1, fails) when a program is missing.
func requireTool(t *testing.T, name, hint string) {
	t.Helper()
	if _, err := exec.LookPath(name); err == nil {
		return
	}
	clientProblems[name] = name + " not found in PATH (" + hint + ")"
	requireClient(t, name)
}

// TestREADMERecipes runs the README's "Point an agent at it" recipes as written, with curl,
// Python requests, git, a Go program and Node, each reaching an https API through escrow that
// answers only to the credential escrow injects.
func TestREADMERecipes(t *testing.T) {
	recipes := loadReadmeRecipes(t)
	api := newUpstream(t, true, map[string]expectation{"api.example.test": bearer(fileSecret)})
	plain := newUpstream(t, false, nil)
	const gitUser = "x-access-token"
	gitSrv := (*gitServer)(nil)
	if _, err := exec.LookPath("git"); err == nil {
		gitSrv = startGitServer(t, gitUser, fileSecret)
	}
	gitAddr := "127.0.0.1:1"
	if gitSrv != nil {
		gitAddr = gitSrv.Addr
	}
	e := startEscrow(t, fmt.Sprintf(`
identity:
  static: spiffe://e2e.test/ns/agents/sa/coder
policy:
  dir: %[1]s
upstreams:
  - host: api.example.test
    credential: api-key
    address: %[2]s
    ca_file: %[3]s
  - host: git.example.test
    credential: api-key
    basic: {username: %[4]s}
    address: %[5]s
    ca_file: %[3]s
  - host: plain.example.test
    address: %[6]s
credentials:
  api-key: {static: {file: %[7]s}}
egress:
  allow_cidrs: [127.0.0.0/8]
`, testdata("policies", "permit-all"), api.Addr, upstreamCA.certFile, gitUser, gitAddr, plain.Addr, fileSecretPath), escrowOptions{})
	env := recipes.recipeEnv(t, e)

	// checkAPI asserts the request reached the API once, with escrow's credential (the upstream
	// answered 200 only to it), and was recorded as allowed.
	checkAPI := func(t *testing.T, path, out string) {
		t.Helper()
		if !strings.Contains(out, `"path":"`+path+`"`) {
			t.Errorf("client output does not show the API's answer for %s:\n%s", path, out)
		}
		checkUpstreamSawOnlyTheRealKey(t, api, path)
		if rec := e.auditFor(t, path); rec.Decision != "allow" || rec.Credential != "api-key" {
			t.Errorf("audit record %s, want allow with credential api-key", rec.Raw)
		}
	}

	t.Run("curl_https", func(t *testing.T) {
		requireClient(t, "curl")
		path := uniquePath("/v1/recipes", "curl")
		out, err := runRecipe(t, e, env, "curl -sS --fail-with-body https://api.example.test"+path)
		if err != nil {
			t.Fatalf("curl: %v\n%s", err, out)
		}
		checkAPI(t, path, out)
	})

	t.Run("curl_http_needs_the_lower_case_http_proxy", func(t *testing.T) {
		requireClient(t, "curl")
		path := uniquePath("/v1/recipes", "curl-http")
		out, err := runRecipe(t, e, env, "curl -sS --fail-with-body http://plain.example.test"+path)
		if err != nil {
			t.Fatalf("curl http://: %v\n%s", err, out)
		}
		if rec := e.auditFor(t, path); rec.Decision != "allow" || rec.Scheme != "http" {
			t.Errorf("audit record %s, want an allowed http request", rec.Raw)
		}
		// Why the README exports both cases: with only HTTP_PROXY, curl goes direct (and
		// cannot even resolve the name).
		out, err = runRecipe(t, e, env, "unset http_proxy\ncurl -sS --max-time 10 http://plain.example.test"+path+"-upper")
		if err == nil {
			t.Errorf("curl with only upper-case HTTP_PROXY reached http://plain.example.test; the README's reason for http_proxy is stale:\n%s", out)
		}
	})

	t.Run("curl_ignores_SSL_CERT_FILE_when_SSL_CERT_DIR_is_set", func(t *testing.T) {
		requireClient(t, "curl")
		// The README's reason for CURL_CA_BUNDLE: many images preset SSL_CERT_DIR (the system
		// roots), and curl then never reads SSL_CERT_FILE.
		path := uniquePath("/v1/recipes", "curl-certdir")
		out, err := runRecipe(t, e, env, "unset CURL_CA_BUNDLE\nexport SSL_CERT_DIR=/etc/ssl/certs\ncurl -sS --max-time 10 https://api.example.test"+path)
		if err == nil {
			t.Errorf("curl trusted escrow's CA through SSL_CERT_FILE despite SSL_CERT_DIR; the README's note on CURL_CA_BUNDLE is stale:\n%s", out)
		}
	})

	t.Run("python_requests", func(t *testing.T) {
		requireClient(t, "python")
		path := uniquePath("/v1/recipes", "python")
		out, err := runRecipe(t, e, env, pythonBin+` -c 'import requests, sys
r = requests.get(sys.argv[1], timeout=20)
print(r.text)
r.raise_for_status()' https://api.example.test`+path)
		if err != nil {
			t.Fatalf("python requests: %v\n%s", err, out)
		}
		checkAPI(t, path, out)
	})

	t.Run("go_net_http", func(t *testing.T) {
		// A Go program with the default client: nothing but the environment.
		dir := t.TempDir()
		src := filepath.Join(dir, "main.go")
		if err := os.WriteFile(src, []byte(`package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	res, err := http.Get(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	b, _ := io.ReadAll(res.Body)
	fmt.Println(string(b))
	if res.StatusCode != http.StatusOK {
		os.Exit(1)
	}
}
`), 0o644); err != nil {
			t.Fatal(err)
		}
		bin := filepath.Join(dir, "agent")
		build := exec.Command("go", "build", "-o", bin, src)
		build.Dir = dir
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("go build: %v\n%s", err, out)
		}
		path := uniquePath("/v1/recipes", "go")
		out, err := runRecipe(t, e, env, bin+" https://api.example.test"+path)
		if err != nil {
			t.Fatalf("Go client: %v\n%s", err, out)
		}
		checkAPI(t, path, out)
	})

	t.Run("git_ls_remote_and_clone", func(t *testing.T) {
		requireTool(t, "git", "Debian: apt-get install git")
		out, err := runRecipe(t, e, env, "git ls-remote https://git.example.test/repo.git")
		if err != nil {
			t.Fatalf("git ls-remote: %v\n%s", err, out)
		}
		if !regexp.MustCompile(`(?m)^[0-9a-f]{40}\trefs/heads/main$`).MatchString(out) {
			t.Errorf("git ls-remote output has no refs/heads/main:\n%s", out)
		}
		out, err = runRecipe(t, e, env, "git clone -q https://git.example.test/repo.git clone\ncat clone/"+gitSrv.file)
		if err != nil {
			t.Fatalf("git clone: %v\n%s", err, out)
		}
		if !strings.Contains(out, gitSrv.content) {
			t.Errorf("the clone does not have the repository's file; output:\n%s", out)
		}
		rec := e.waitAudit(t, "git clone", func(r auditRecord) bool {
			return r.Host == "git.example.test" && strings.HasSuffix(r.Path, "/git-upload-pack") && r.Method == "POST"
		})
		if rec.Decision != "allow" || rec.Credential != "api-key" || rec.UpstreamStatus != http.StatusOK {
			t.Errorf("audit record %s, want an allowed upload-pack with the credential", rec.Raw)
		}
	})

	t.Run("node", func(t *testing.T) {
		requireTool(t, "node", "Debian: apt-get install nodejs npm")
		major, minor, err := nodeVersion()
		if err != nil {
			t.Fatal(err)
		}
		builtin := major > 22 || (major == 22 && minor >= 21)
		script := filepath.Join(t.TempDir(), "agent.js")
		body := `
fetch(process.argv[2]).then(async (r) => {
  console.log(await r.text());
  process.exit(r.ok ? 0 : 1);
}).catch((e) => { console.error(e); process.exit(2); });
`
		var extra []string
		if builtin {
			t.Logf("node %d.%d: NODE_USE_ENV_PROXY=1 alone", major, minor)
		} else {
			requireTool(t, "npm", "Debian: apt-get install npm")
			dir, problem := undiciDir()
			if dir == "" {
				clientProblems["undici"] = problem
				requireClient(t, "undici")
			}
			t.Logf("node %d.%d: the README's undici recipe (undici %s)", major, minor, undiciVersion)
			body = recipes.node + "\n" + body
			// Where `npm install undici` would have put it: the app's node_modules.
			extra = append(extra, "NODE_PATH="+filepath.Join(dir, "node_modules"))
		}
		if err := os.WriteFile(script, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Run("https", func(t *testing.T) {
			path := uniquePath("/v1/recipes", "node")
			out, err := runRecipe(t, e, env, "node "+script+" https://api.example.test"+path, extra...)
			if err != nil {
				t.Fatalf("node: %v\n%s", err, out)
			}
			checkAPI(t, path, out)
		})
		t.Run("http", func(t *testing.T) {
			// Node's proxy support tunnels http:// URLs too (CONNECT plain.example.test:80):
			// escrow reads HTTP inside that tunnel and runs the same pipeline.
			path := uniquePath("/v1/recipes", "node-http")
			out, err := runRecipe(t, e, env, "node "+script+" http://plain.example.test"+path, extra...)
			if err != nil {
				t.Fatalf("node http://: %v\n%s", err, out)
			}
			if !strings.Contains(out, `"path":"`+path+`"`) {
				t.Errorf("node output does not show the upstream's answer:\n%s", out)
			}
			if rec := e.auditFor(t, path); rec.Decision != "allow" {
				t.Errorf("audit record %s, want allow", rec.Raw)
			}
		})
	})

	e.finish(t)
}
