package harness

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// PostgresBinEnv names the directory holding initdb, postgres and psql; default: the newest
// /usr/lib/postgresql/*/bin (Debian's postgresql package), else the PATH.
const PostgresBinEnv = "ESCROW_POSTGRES_BIN"

// Postgres is a throwaway PostgreSQL server on loopback TCP with password (SCRAM) logins only,
// the backend of Vault's database secrets engine in the tests.
type Postgres struct {
	Host string // 127.0.0.1
	Port int
	// Superuser and SuperPassword are the cluster's owner (test setup and Vault's root
	// connection only).
	Superuser, SuperPassword string

	bin  string
	cred *syscall.Credential
	proc *Process
}

// StartPostgres initialises a cluster in a temporary directory and starts it. Run as root, it
// runs as the postgres user (PostgreSQL refuses root); otherwise as this user.
func StartPostgres(t testing.TB) *Postgres {
	t.Helper()
	bin := postgresBin(t)
	dir := ShortTempDir(t)
	pg := &Postgres{Host: "127.0.0.1", Port: FreePort(t), Superuser: "escrow_admin", SuperPassword: "pg-" + randomHex(t, 12), bin: bin}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("harness: running as root, PostgreSQL needs the postgres user (Debian's postgresql package creates it): %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		pg.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	data := filepath.Join(dir, "data")
	pwfile := filepath.Join(dir, "pw")
	if err := os.WriteFile(pwfile, []byte(pg.SuperPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if pg.cred != nil {
		if err := os.Chown(pwfile, int(pg.cred.Uid), int(pg.cred.Gid)); err != nil {
			t.Fatal(err)
		}
	}
	initdb := exec.Command(filepath.Join(bin, "initdb"), "-D", data, "-U", pg.Superuser, "--pwfile="+pwfile,
		"--auth=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C")
	initdb.Env = CleanEnv()
	initdb.Dir = dir
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: pg.cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		t.Fatalf("harness: initdb: %v\n%s", err, out)
	}
	pg.proc = StartProcess(t, ProcessOptions{Name: "postgres", Path: filepath.Join(bin, "postgres"), Dir: dir, Credential: pg.cred, Args: []string{
		"-D", data, "-h", pg.Host, "-p", strconv.Itoa(pg.Port), "-k", dir,
		"-c", "fsync=off", "-c", "log_connections=on",
	}})
	Eventually(t, 30*time.Second, "PostgreSQL accepting logins", func() error {
		if pg.proc.Exited() {
			t.Fatalf("harness: postgres exited (%v):\n%s", pg.proc.Err(), tailBytes(pg.proc.Output(), 8<<10))
		}
		_, err := pg.Query(pg.Superuser, pg.SuperPassword, "select 1")
		return err
	})
	return pg
}

// Query runs sql with psql as user/password over TCP and returns the unaligned rows; an error
// means the login or the statement failed.
func (pg *Postgres) Query(user, password, sql string) (string, error) {
	cmd := exec.Command(filepath.Join(pg.bin, "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
		"-h", pg.Host, "-p", strconv.Itoa(pg.Port), "-U", user, "-d", "postgres", "-c", sql)
	// The password goes through the environment, not argv (visible in ps).
	cmd.Env = CleanEnv("PGPASSWORD="+password, "PGCONNECT_TIMEOUT=5")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("psql as %s: %v: %s", user, err, strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

// Roles lists the login roles other than the superuser.
func (pg *Postgres) Roles(t testing.TB) []string {
	t.Helper()
	out, err := pg.Query(pg.Superuser, pg.SuperPassword, fmt.Sprintf("select rolname from pg_roles where rolcanlogin and rolname <> '%s' order by 1", pg.Superuser))
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	if out == "" {
		return nil
	}
	return strings.Split(out, "\n")
}

func postgresBin(t testing.TB) string {
	t.Helper()
	if d := os.Getenv(PostgresBinEnv); d != "" {
		return d
	}
	if m, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb"); len(m) > 0 {
		sort.Slice(m, func(i, j int) bool { // newest major version first
			vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(m[i]))))
			vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(m[j]))))
			return vi > vj
		})
		return filepath.Dir(m[0])
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p)
	}
	msg := "PostgreSQL (initdb, postgres, psql) not found: install Debian's postgresql package or set " + PostgresBinEnv
	if os.Getenv(RequireEnv) == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}
