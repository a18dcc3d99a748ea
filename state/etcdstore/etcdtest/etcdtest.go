// Package etcdtest starts a real, embedded etcd member for tests: one
// process-local server on 127.0.0.1 random ports, its data in a temporary
// directory. It links go.etcd.io/etcd/server/v3, so only tests import it.
package etcdtest

import (
	"net/url"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Member is a running embedded etcd member.
type Member struct {
	// Endpoint is its client endpoint, 127.0.0.1:PORT.
	Endpoint string
	etcd     *embed.Etcd
}

// Start starts a one-member cluster with its data in tb.TempDir(), stopped
// by tb's cleanup.
func Start(tb testing.TB) *Member {
	tb.Helper()
	cfg := embed.NewConfig()
	cfg.Dir = tb.TempDir()
	cfg.Name = "embedded"
	local := url.URL{Scheme: "http", Host: "127.0.0.1:0"}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{local}, []url.URL{local}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{local}, []url.URL{local}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		tb.Fatalf("starting an embedded etcd: %v", err)
	}
	tb.Cleanup(e.Close)
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		tb.Fatalf("embedded etcd: %v", err)
	case <-time.After(30 * time.Second):
		tb.Fatal("embedded etcd not ready after 30 s")
	}
	return &Member{Endpoint: e.Clients[0].Addr().String(), etcd: e}
}
