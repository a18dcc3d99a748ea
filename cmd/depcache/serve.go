package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/depcache/depcache/cmd/internal/gctune"
	"github.com/depcache/depcache/manager"
	"github.com/nightlyone/lockfile"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
)

// errAlreadyServing: another serve runs for this root on this host.
var errAlreadyServing = errors.New("already served")

func newServe(g *globals) *cobra.Command {
	var (
		listen string
		lf     loopFlags
		pf     policyFlags
	)
	cmd := &cobra.Command{
		Use: "serve",
		Example: `  depcache serve
  depcache policy set --max-size 50GiB && depcache serve --listen 0.0.0.0:9736   # the budget every worker shares
  curl -s 127.0.0.1:9736/healthz`,
		Short: "Run the transition and cleanup loops for the root until SIGINT or SIGTERM, with /healthz, /metrics, /v1/entries and a status page",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			// Before anything is opened: a bad port is bad input, whatever
			// the state store or the Docker engine would say.
			if err := checkListen(listen); err != nil {
				return err
			}
			g.log.WithField("gogc", gctune.Serve()).Debug("garbage collector target")
			cfg, err := g.config(&lf, &pf)
			if err != nil {
				return err
			}
			root, err := filepath.Abs(cfg.Root)
			if err != nil {
				return err
			}
			// One serve per root and host: a pid file on local disk, where
			// lockfile's pid check is right (it is wrong across hosts, and
			// never returns on sshfs).
			pidPath := servePidPath(root)
			pidFile, err := lockfile.New(pidPath)
			if err != nil {
				return err
			}
			if err := pidFile.TryLock(); err != nil {
				if owner, oerr := pidFile.GetOwner(); oerr == nil {
					return fmt.Errorf("depcache serve (pid %d) already serves %s on this host (pid file %s): %w", owner.Pid, root, pidPath, errAlreadyServing)
				}
				return fmt.Errorf("pid file %s: %w", pidPath, err)
			}
			defer pidFile.Unlock()

			reg := prometheus.NewRegistry()
			reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
			cfg.Metrics = reg
			cfg.DriveAll = true
			m, err := manager.New(cfg)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			stop, err := m.Start(ctx)
			if err != nil {
				return err
			}
			g.notePolicyMismatch(m)
			ln, err := net.Listen("tcp", listen)
			if err != nil {
				stop()
				return fmt.Errorf("--listen %s: %w", listen, err)
			}
			// The server's own complaints (a handler's panic, accept
			// errors such as too many open files) are log records.
			errLog := g.log.WriterLevel(logrus.WarnLevel)
			defer errLog.Close()
			srv := &http.Server{Handler: serveMux(m, reg), ReadHeaderTimeout: 10 * time.Second,
				ErrorLog: log.New(errLog, "", 0)}
			g.log.WithField("root", root).WithField("addr", ln.Addr().String()).Info("serving")
			fmt.Fprintf(g.stderr, "depcache: serving %s on http://%s\n", root, ln.Addr())
			errc := make(chan error, 1)
			go func() { errc <- srv.Serve(ln) }()
			select {
			case <-ctx.Done():
			case err = <-errc:
			}
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			srv.Shutdown(sctx)
			if serr := stop(); err == nil {
				err = serr
			}
			if errors.Is(err, http.ErrServerClosed) {
				err = nil
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&listen, "listen", "127.0.0.1:9736", "address of the HTTP listener (/healthz, /metrics, /v1/entries, /)")
	lf.register(f)
	pf.register(f)
	return cmd
}

// servePidPath is the pid file of the serve of root (an absolute path) on
// this host. It is named by the root with its symbolic links resolved: a
// link to a root is the same root, and a second serve through it must
// find the first one's pid file.
func servePidPath(root string) string {
	sum := sha256.Sum256([]byte(resolveExisting(root)))
	return filepath.Join(os.TempDir(), "depcache-serve-"+hex.EncodeToString(sum[:8])+".pid")
}

// resolveExisting is p with the symbolic links of its longest existing
// prefix resolved: a root that does not exist yet (the first serve makes
// it) is named as it will be once it does.
func resolveExisting(p string) string {
	rest := ""
	for dir := filepath.Clean(p); ; {
		if r, err := filepath.EvalSymlinks(dir); err == nil {
			return filepath.Join(r, rest)
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return p
		}
		rest = filepath.Join(filepath.Base(dir), rest)
		dir = parent
	}
}

// localServe returns the pid of the serve that serves root on this host,
// if one runs (as its pid file says; a serve on another host is not seen).
func localServe(root string) (int, bool) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return 0, false
	}
	f, err := lockfile.New(servePidPath(abs))
	if err != nil {
		return 0, false
	}
	p, err := f.GetOwner()
	if err != nil {
		return 0, false
	}
	return p.Pid, true
}

func serveMux(m *manager.Manager, reg *prometheus.Registry) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if _, err := m.Entries(r.Context()); err != nil {
			http.Error(w, "state unreadable: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /v1/entries", func(w http.ResponseWriter, r *http.Request) {
		out, err := describeEntries(r.Context(), m)
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		printJSON(w, out)
	})
	mux.HandleFunc("GET /{$}", serveStatus(m))
	return mux
}

// checkListen refuses, before anything starts, a listen address whose
// port is out of range or names no service: bad input (exit 2), where a
// failure to listen (the port in use, a host with no such address) is
// found only by listening.
func checkListen(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--listen %s: %w: %w", addr, errBadFlag, err)
	}
	if n, err := strconv.Atoi(port); err == nil {
		if n < 0 || n > 65535 {
			return fmt.Errorf("--listen %s: %w: port %d out of range (0 to 65535)", addr, errBadFlag, n)
		}
		return nil
	}
	if _, err := net.LookupPort("tcp", port); err != nil {
		return fmt.Errorf("--listen %s: %w: port %q is no number and names no known service", addr, errBadFlag, port)
	}
	return nil
}
