package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/depcache/depcache/state"
	"github.com/dustin/go-humanize"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// ErrNoLock is what BreakHolder returns: the etcd store takes no lock.
var ErrNoLock = errors.New("the etcd state store holds no lock")

// Checks reports on the cluster: each endpoint's status, the leader, the
// alarms (NOSPACE), the database size against its quota, the history
// kept (compaction), and commit records left behind. It changes nothing.
func (s *Store) Checks(ctx context.Context) []state.Check {
	out := s.clusterChecks(ctx)
	add := func(name, status, format string, args ...any) {
		out = append(out, state.Check{Name: name, Status: status, Detail: fmt.Sprintf(format, args...)})
	}
	rctx, cancel := s.rctx(ctx)
	alarms, err := s.cli.AlarmList(rctx)
	cancel()
	switch {
	case err != nil:
		add("etcd alarms", "fail", "%v", s.fail(ctx, "alarm list", err))
	case len(alarms.Alarms) == 0:
		add("etcd alarms", "ok", "none")
	default:
		var list []string
		for _, a := range alarms.Alarms {
			what := a.Alarm.String()
			if a.Alarm == etcdserverpb.AlarmType_NOSPACE {
				what += " (the database reached its quota: writes fail until it is compacted, defragmented and the alarm disarmed)"
			}
			list = append(list, fmt.Sprintf("member %x: %s", a.MemberID, what))
		}
		add("etcd alarms", "fail", "%s", strings.Join(list, "; "))
	}
	out = append(out, s.compactionCheck(ctx))
	rctx, cancel = s.rctx(ctx)
	n, err := s.cli.Get(rctx, s.l.noncePrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
	cancel()
	if err == nil {
		add("etcd commit records", "ok", "%d under %s (each expires 10 minutes after its commit)", n.Count, s.l.noncePrefix())
	}
	return out
}

// ClusterChecks reports, for a doctor whose Open failed (ErrUnavailable),
// what Checks reports first: each endpoint's status and the leader. Those
// need no leader and read no key, so that a cluster without quorum still
// says which members answer and what each knows. It uses opts.Client
// when set. With credentials it can say no more than that the client
// could not log in: etcd answers a login only with a quorum.
func ClusterChecks(ctx context.Context, opts Options) []state.Check {
	opts.setDefaults()
	cli := opts.Client
	if cli == nil {
		// With credentials, the client logs in as it dials, which a
		// cluster without quorum cannot answer: then this one check
		// is all there is to say.
		c, err := dial(ctx, opts)
		if err != nil {
			return []state.Check{{Name: "etcd endpoints", Status: "fail", Detail: fmt.Sprintf("no client for %s: %v", strings.Join(opts.Endpoints, ","), err)}}
		}
		defer c.Close()
		cli = c
	}
	name := "etcd " + strings.Join(cli.Endpoints(), ",")
	s := &Store{cli: cli, name: name, timeout: opts.RequestTimeout, tls: opts.TLS}
	return s.clusterChecks(ctx)
}

// clusterChecks reports each endpoint's status and the leader.
func (s *Store) clusterChecks(ctx context.Context) []state.Check {
	var out []state.Check
	add := func(name, status, format string, args ...any) {
		out = append(out, state.Check{Name: name, Status: status, Detail: fmt.Sprintf(format, args...)})
	}
	leaders := map[uint64]bool{}
	var reachable int
	// Asked side by side: a member that is down costs the request
	// timeout, once, not once per member.
	eps := s.cli.Endpoints()
	type answer struct {
		st  *clientv3.StatusResponse
		err error
	}
	answers := make([]answer, len(eps))
	var wg sync.WaitGroup
	for i, ep := range eps {
		wg.Go(func() {
			// Not s.rctx: a status is what a member without a leader
			// can still give, and what an operator needs most then.
			rctx, cancel := context.WithTimeout(ctx, s.timeout)
			defer cancel()
			answers[i].st, answers[i].err = s.cli.Status(rctx, ep)
		})
	}
	wg.Wait()
	for i, ep := range eps {
		st, err := answers[i].st, answers[i].err
		name := "etcd " + ep
		if err != nil {
			err = s.fail(ctx, "status of "+ep, err)
			if errors.Is(err, ErrUnavailable) {
				if why := notEtcd(ctx, []string{ep}, s.tls); why != "" {
					err = fmt.Errorf("status of %s: %w: %s", ep, ErrUnavailable, why)
				}
			}
			add(name, "fail", "no status: %v", err)
			continue
		}
		reachable++
		if st.Leader != 0 {
			leaders[st.Leader] = true
		}
		detail := fmt.Sprintf("version %s, member %x, raft term %d, applied index %d", st.Version, st.Header.MemberId, st.RaftTerm, st.RaftAppliedIndex)
		status := "ok"
		if len(st.Errors) > 0 {
			status, detail = "fail", detail+"; errors: "+strings.Join(st.Errors, "; ")
		}
		if st.Leader == 0 {
			status, detail = "fail", detail+"; no leader"
		}
		add(name, status, "%s", detail)
		if st.DbSizeQuota > 0 {
			pct := 100 * float64(st.DbSize) / float64(st.DbSizeQuota)
			status := "ok"
			if pct >= 80 {
				status = "warn"
			}
			add(name+" database", status, "%s of a %s quota (%.0f%%; %s in use: compaction and defragmentation give back the rest)",
				humanize.IBytes(uint64(st.DbSize)), humanize.IBytes(uint64(st.DbSizeQuota)), pct, humanize.IBytes(uint64(st.DbSizeInUse)))
		}
	}
	switch {
	case reachable == 0:
		add("etcd leader", "fail", "no endpoint answered")
	case len(leaders) == 1:
		for id := range leaders {
			add("etcd leader", "ok", "member %x%s", id, s.memberName(ctx, id))
		}
	case len(leaders) == 0:
		add("etcd leader", "fail", "no member knows a leader: the cluster has no quorum")
	default:
		add("etcd leader", "warn", "members disagree on the leader (an election is under way?)")
	}
	return out
}

// compactionWarnRevisions is how much history, in revisions, a cluster
// may keep without ever having been compacted before doctor warns: every
// commit of every manager adds a revision, and etcd keeps them all until
// something compacts, so the database grows until it reaches its quota
// and refuses writes (the NOSPACE alarm). A young cluster may simply not
// have reached its first compaction; a million revisions is hours of a
// busy cache.
var compactionWarnRevisions int64 = 1_000_000

// compactionCheck reports how much history the cluster keeps: the oldest
// revision it still serves, found by bisection (a read at a compacted
// revision fails with ErrCompacted), against the current one. etcd does
// not say whether --auto-compaction-retention is set, but a cluster that
// was never compacted in a long history has none.
func (s *Store) compactionCheck(ctx context.Context) state.Check {
	c := state.Check{Name: "etcd compaction"}
	available := func(rev int64) (bool, error) {
		var err error
		rerr := s.read(ctx, func(rctx context.Context) error {
			_, err = s.cli.Get(rctx, s.l.format(), clientv3.WithRev(rev), clientv3.WithCountOnly())
			if errors.Is(err, rpctypes.ErrCompacted) {
				return nil
			}
			return err
		})
		if rerr != nil {
			return false, s.fail(ctx, "reading the history", rerr)
		}
		return !errors.Is(err, rpctypes.ErrCompacted), nil
	}
	var cur int64
	err := s.read(ctx, func(rctx context.Context) error {
		resp, err := s.cli.Get(rctx, s.l.format(), clientv3.WithCountOnly())
		if err == nil {
			cur = resp.Header.Revision
		}
		return err
	})
	if err != nil {
		c.Status, c.Detail = "fail", s.fail(ctx, "reading the revision", err).Error()
		return c
	}
	ok, err := available(1)
	if err != nil {
		c.Status, c.Detail = "fail", err.Error()
		return c
	}
	if ok {
		c.Status = "ok"
		c.Detail = fmt.Sprintf("never compacted: all %d revisions of history kept; configure compaction (etcd --auto-compaction-retention, e.g. 1h) or the database grows until its quota", cur)
		if cur >= compactionWarnRevisions {
			c.Status = "warn"
		}
		return c
	}
	lo, hi := int64(1), cur // lo compacted, hi available
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		ok, err := available(mid)
		if err != nil {
			c.Status, c.Detail = "fail", err.Error()
			return c
		}
		if ok {
			hi = mid
		} else {
			lo = mid
		}
	}
	c.Status = "ok"
	c.Detail = fmt.Sprintf("compacted up to revision %d: %d revisions of history kept (current %d)", hi, cur-hi+1, cur)
	return c
}

func (s *Store) memberName(ctx context.Context, id uint64) string {
	rctx, cancel := s.rctx(ctx)
	defer cancel()
	ml, err := s.cli.MemberList(rctx)
	if err != nil {
		return ""
	}
	for _, m := range ml.Members {
		if m.ID == id {
			return fmt.Sprintf(" (%s, %s)", m.Name, strings.Join(m.ClientURLs, ","))
		}
	}
	return ""
}

// Holder returns "": commits are compare-and-swap transactions, and no
// lock is held between them.
func (s *Store) Holder() string { return "" }

// BreakHolder returns ErrNoLock: there is no lock to break.
func (s *Store) BreakHolder(context.Context, string) error {
	return fmt.Errorf("%s: %w: commits are compare-and-swap transactions, so there is nothing to break", s, ErrNoLock)
}

var _ state.Inspector = (*Store)(nil)
