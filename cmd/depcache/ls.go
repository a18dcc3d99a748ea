package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/depcache/depcache/manager"
	"github.com/depcache/depcache/state"
	"github.com/depcache/depcache/transitions"
	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

// entryJSON is one element of `ls --json` (and `get --json`). Its fields
// are a contract: add, never rename or drop.
type entryJSON struct {
	Key        string         `json:"key"`
	Kind       string         `json:"kind"`
	Source     string         `json:"source"`
	SHA256     string         `json:"sha256,omitempty"`
	Stage      string         `json:"stage"`
	Path       string         `json:"path"`
	ImageID    string         `json:"image_id"`
	RepoDigest string         `json:"repo_digest,omitempty"`
	Daemon     string         `json:"daemon,omitempty"`
	SizeBytes  int64          `json:"size_bytes"`
	Dependents []string       `json:"dependents"`
	LastUsed   string         `json:"last_used"`
	Created    string         `json:"created"`
	Owner      *ownerJSON     `json:"owner"`
	Generation uint64         `json:"generation"`
	Progress   state.Progress `json:"progress"`
	Failures   int            `json:"failures"`
	Message    string         `json:"message"`
	// Queued: DOWNLOADING with no owner (get --no-wait with nobody else
	// driving it): it waits for a serve, or a get that waits, on the root.
	Queued bool `json:"queued"`
	manager.Description
}

type ownerJSON struct {
	Host string `json:"host"`
	PID  int    `json:"pid"`
}

func toJSON(m *manager.Manager, e state.Entry) entryJSON {
	j := entryJSON{
		Key: e.Key.ID(), Kind: string(e.Key.Kind), Source: e.Key.Source, SHA256: e.Key.SHA256,
		Stage: string(e.Stage), ImageID: e.ImageID, RepoDigest: e.RepoDigest, Daemon: e.Key.Daemon, SizeBytes: e.SizeBytes, Dependents: []string{},
		LastUsed: rfc3339(e.LastUsed), Created: rfc3339(e.Created), Generation: e.Generation,
		Progress: e.Progress, Failures: e.Failures, Message: e.Message,
		Queued: e.Stage == state.Downloading && e.Owner == nil,
	}
	j.Description.Dependents = []manager.DependentInfo{}
	if e.Path != "" {
		j.Path, _ = m.Abs(e)
	}
	for name := range e.Dependents {
		j.Dependents = append(j.Dependents, name)
	}
	sort.Strings(j.Dependents)
	if e.Owner != nil {
		j.Owner = &ownerJSON{Host: e.Owner.Host, PID: e.Owner.PID}
	}
	return j
}

func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// lsOptions are ls's flags.
type lsOptions struct {
	sort    string
	reverse bool
	filters []string
	quiet   bool
	noTrunc bool
}

// row is one entry of ls: what --json prints and the entry it came from.
type row struct {
	j entryJSON
	e *state.Entry
}

func newLs(g *globals) *cobra.Command {
	var o lsOptions
	cmd := &cobra.Command{
		Use:   "ls [flags] [SOURCE|PATTERN|ID...]",
		Short: "List the cache's entries",
		Long: `ls lists the cache's entries: a short KEY (the first 12 hex characters of the
key ID; --no-trunc for all 32), the stage, the size, the sha256 the entry was
fetched with ("-": none was given), the dependents, when it was last used,
why a sweep keeps it (in use, pinned, too young), the source and the path.
A totals line follows: entries, usage against the budget, bytes in use,
free disk. --json prints every field, with times in RFC 3339.

Arguments select entries: a SOURCE (normalised as get normalises it), a
pattern on sources in which * and ? match any characters, / included
('*hello*'), or a key ID prefix of at least 8 hex characters.

Filters, repeatable (all must hold): stage=READY|FAILED|DOWNLOADING,
kind=bundle|image, unused=DURATION (no live dependent and not used for that
long; 7d, 36h, 1d12h), in-use=true|false, dependent=NAME.

-q prints only the KEY column, one per line; with --json, a JSON array of
the full key IDs (--json output is always JSON, its keys always full).`,
		Example: `  depcache ls
  depcache ls --sort size
  depcache ls --filter stage=FAILED
  depcache ls --filter unused=7d -q | xargs -r depcache rm -y
  depcache ls 'https://example.com/*'
  depcache ls --json | jq -r '.[] | select(.stage == "READY") | .path'`,
		RunE: func(cmd *cobra.Command, args []string) error {
			sel, err := newSelector(args, o.filters, time.Now())
			if err != nil {
				return err
			}
			less, err := sorter(o.sort)
			if err != nil {
				return err
			}
			if err := existingRoot(g); err != nil {
				return err
			}
			// On a root with images, KEPT says which containers use them:
			// this host's engine is asked.
			cfg, err := g.engineConfig()
			if err != nil {
				return err
			}
			m, err := manager.New(cfg)
			if err != nil {
				return err
			}
			st, rows, err := describeRows(cmd.Context(), m, manager.WithContainers())
			if err != nil {
				return err
			}
			shown := make([]row, 0, len(rows)) // rows are large: growing the slice copied them over and over
			for _, r := range rows {
				if sel.match(r) {
					shown = append(shown, r)
				}
			}
			if less != nil {
				sort.SliceStable(shown, func(i, j int) bool {
					if o.reverse {
						return less(shown[j], shown[i])
					}
					return less(shown[i], shown[j])
				})
			} else if o.reverse {
				slices.Reverse(shown)
			}
			key := shortID
			if o.noTrunc {
				key = func(id string) string { return id }
			}
			switch {
			case o.quiet && g.json:
				// --json promises JSON on stdout, and keys in it are full
				// IDs: an array of them (not -q's short KEY column).
				ids := make([]string, 0, len(shown))
				for _, r := range shown {
					ids = append(ids, r.j.Key)
				}
				return printJSON(g.stdout, ids)
			case o.quiet:
				for _, r := range shown {
					fmt.Fprintln(g.stdout, key(r.j.Key))
				}
				return nil
			case g.json:
				out := make([]entryJSON, 0, len(shown))
				for _, r := range shown {
					out = append(out, r.j)
				}
				return printJSON(g.stdout, out)
			}
			tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "KEY\tSTAGE\tSIZE\tSHA256\tDEPENDENTS\tLAST USED\tKEPT\tSOURCE\tDETAIL")
			for _, r := range shown {
				e := r.j
				detail := e.Path
				switch {
				case e.Stage == string(state.Downloading) && e.Owner != nil:
					detail = fmt.Sprintf("gen %d by pid %d on %s, %s", e.Generation, e.Owner.PID, e.Owner.Host, humanize.IBytes(uint64(e.Progress.Bytes)))
				case e.Queued:
					detail = "queued: no process downloads it yet (a serve on the root, or a get of it that waits, takes it up)"
				case e.Stage == string(state.Failed):
					detail = e.Message
				case e.Kind == string(state.Image):
					detail = fmt.Sprintf("%s on daemon %.12s", e.ImageID, e.Daemon)
				}
				kept := e.Kept
				if kept == "" {
					kept = "-"
				}
				digest := "-"
				if e.SHA256 != "" {
					digest = e.SHA256[:min(12, len(e.SHA256))]
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", key(e.Key), e.Stage, humanize.IBytes(uint64(e.SizeBytes)), digest,
					len(e.Dependents), ago(r.e.LastUsed), kept, e.Source, detail)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, r := range shown {
				for _, d := range r.j.Description.Dependents {
					fmt.Fprintf(g.stdout, "  %s: dependent %s: %s\n", r.j.Source, d.Name, d.Liveness)
				}
			}
			fmt.Fprintln(g.stdout, totals(m.Root(), st, rows, len(shown)))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.sort, "sort", "", "order by size (largest first), last-used (most recent first) or source; default: key")
	f.BoolVar(&o.reverse, "reverse", false, "reverse the order")
	f.StringArrayVar(&o.filters, "filter", nil, "stage=S, kind=K, unused=DURATION, in-use=BOOL or dependent=NAME; repeatable")
	f.BoolVarP(&o.quiet, "quiet", "q", false, "print only the keys (for depcache rm); with --json, a JSON array of the full key IDs")
	f.BoolVar(&o.noTrunc, "no-trunc", false, "print full 32-character key IDs (what --pin takes)")
	return cmd
}

// ago says when t was, as people say it ("5 minutes ago"); "-" for never.
func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return humanize.Time(t)
}

// totals is ls's last line: the whole cache, whatever was shown.
func totals(root string, st *state.State, rows []row, shown int) string {
	pol := state.DefaultPolicy()
	if st.Policy != nil {
		pol = *st.Policy
	}
	var inUse int64
	for _, r := range rows {
		for _, d := range r.j.Description.Dependents {
			if d.Live {
				inUse += r.e.SizeBytes
				break
			}
		}
	}
	n := fmt.Sprintf("%d entries", len(rows))
	if len(rows) == 1 {
		n = "1 entry"
	}
	if shown != len(rows) {
		n = fmt.Sprintf("%d of %s shown", shown, n)
	}
	s := fmt.Sprintf("%s, %s used of budget %s, %s in use", n, humanize.IBytes(uint64(transitions.Measure(st.Entries))), budget(pol.MaxSizeBytes), humanize.IBytes(uint64(inUse)))
	var fs unix.Statfs_t
	if err := unix.Statfs(root, &fs); err == nil {
		s += fmt.Sprintf(", %s free on disk", humanize.IBytes(uint64(fs.Bavail)*uint64(fs.Bsize)))
	}
	return s
}

// sorter returns the order of --sort, nil for the default (by key).
func sorter(by string) (func(a, b row) bool, error) {
	switch by {
	case "", "key":
		return nil, nil
	case "size":
		return func(a, b row) bool { return a.e.SizeBytes > b.e.SizeBytes }, nil
	case "last-used":
		return func(a, b row) bool { return a.e.LastUsed.After(b.e.LastUsed) }, nil
	case "source":
		return func(a, b row) bool { return a.e.Key.Source < b.e.Key.Source }, nil
	}
	return nil, usageErrorf("--sort %q: want size, last-used or source", by)
}

// selector is ls's arguments and filters.
type selector struct {
	args []func(e *state.Entry) bool
	all  []func(r row) bool
}

func (s selector) match(r row) bool {
	if len(s.args) > 0 && !slices.ContainsFunc(s.args, func(f func(*state.Entry) bool) bool { return f(r.e) }) {
		return false
	}
	for _, f := range s.all {
		if !f(r) {
			return false
		}
	}
	return true
}

func newSelector(args, filters []string, now time.Time) (selector, error) {
	var s selector
	for _, a := range args {
		switch {
		case strings.ContainsAny(a, "*?"):
			re := regexp.MustCompile("^" + strings.NewReplacer(`\*`, ".*", `\?`, ".").Replace(regexp.QuoteMeta(a)) + "$")
			s.args = append(s.args, func(e *state.Entry) bool { return re.MatchString(e.Key.Source) })
		case isIDPrefix(a):
			if len(a) < minIDPrefix {
				return s, usageErrorf("key ID prefix %q: want at least %d hex characters", a, minIDPrefix)
			}
			id := strings.ToLower(a)
			s.args = append(s.args, func(e *state.Entry) bool { return strings.HasPrefix(e.Key.ID(), id) })
		default:
			k, err := manager.ParseKey(a, "")
			if err != nil {
				return s, err
			}
			s.args = append(s.args, func(e *state.Entry) bool { return e.Key.Kind == k.Kind && e.Key.Source == k.Source })
		}
	}
	for _, f := range filters {
		name, v, ok := strings.Cut(f, "=")
		if !ok {
			return s, usageErrorf("--filter %q: want NAME=VALUE", f)
		}
		live := func(r row) bool {
			return slices.ContainsFunc(r.j.Description.Dependents, func(d manager.DependentInfo) bool { return d.Live })
		}
		switch name {
		case "stage":
			stage := strings.ToUpper(v)
			if stage != string(state.Ready) && stage != string(state.Failed) && stage != string(state.Downloading) {
				return s, usageErrorf("--filter stage=%s: want READY, FAILED or DOWNLOADING", v)
			}
			s.all = append(s.all, func(r row) bool { return string(r.e.Stage) == stage })
		case "kind":
			kind := strings.ToLower(v)
			if kind != string(state.Bundle) && kind != string(state.Image) {
				return s, usageErrorf("--filter kind=%s: want %s or %s", v, state.Bundle, state.Image)
			}
			s.all = append(s.all, func(r row) bool { return string(r.e.Key.Kind) == kind })
		case "unused":
			d, err := parseAge(v)
			if err != nil {
				return s, usageErrorf("--filter unused=%s: %v", v, err)
			}
			s.all = append(s.all, func(r row) bool {
				used := r.e.LastUsed
				if used.IsZero() {
					used = r.e.Created
				}
				return !live(r) && now.Sub(used) >= d
			})
		case "in-use":
			want, err := strconv.ParseBool(v)
			if err != nil {
				return s, usageErrorf("--filter in-use=%s: want true or false", v)
			}
			s.all = append(s.all, func(r row) bool { return live(r) == want })
		case "dependent":
			if v == "" {
				return s, usageErrorf("--filter dependent=: empty (want the NAME given to get --dependent)")
			}
			s.all = append(s.all, func(r row) bool { _, ok := r.e.Dependents[v]; return ok })
		default:
			return s, usageErrorf("--filter %q: unknown filter %q (want stage, kind, unused, in-use or dependent)", f, name)
		}
	}
	return s, nil
}

// parseAge is time.ParseDuration with days: "7d", "1d12h", "36h".
// A count of days past maxAgeDays, or days and a rest that add up past the
// longest Duration, is refused: wrapped, it turned negative and selected
// every entry.
func parseAge(v string) (time.Duration, error) {
	var days time.Duration
	if i := strings.IndexByte(v, 'd'); i > 0 {
		n, err := strconv.Atoi(v[:i])
		if err != nil || n < 0 {
			return 0, fmt.Errorf("want a duration such as 7d, 36h or 1d12h")
		}
		if n > maxAgeDays {
			return 0, fmt.Errorf("%dd is out of range: at most %dd (about 292 years)", n, maxAgeDays)
		}
		days, v = time.Duration(n)*24*time.Hour, v[i+1:]
		if v == "" {
			return days, nil
		}
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("want a duration such as 7d, 36h or 1d12h")
	}
	if d > math.MaxInt64-days {
		return 0, fmt.Errorf("out of range: at most %dd%s in all (about 292 years)", maxAgeDays, time.Duration(math.MaxInt64)-time.Duration(maxAgeDays)*24*time.Hour)
	}
	return days + d, nil
}

// maxAgeDays is the most whole days a time.Duration holds.
const maxAgeDays = int(math.MaxInt64 / int64(24*time.Hour))

// describeEntries is the content of ls --json and of serve's /v1/entries.
func describeEntries(ctx context.Context, m *manager.Manager) ([]entryJSON, error) {
	_, rows, err := describeRows(ctx, m)
	if err != nil {
		return nil, err
	}
	out := make([]entryJSON, 0, len(rows))
	for _, r := range rows {
		out = append(out, r.j)
	}
	return out, nil
}

func describeRows(ctx context.Context, m *manager.Manager, opts ...manager.DescribeOption) (*state.State, []row, error) {
	st, desc, err := m.Describe(ctx, opts...)
	if err != nil {
		return nil, nil, err
	}
	out := make([]row, 0, len(st.Entries))
	for _, e := range st.Sorted() {
		j := toJSON(m, *e)
		j.Description = desc[e.Key.ID()] // its Dependents are [] when none
		out = append(out, row{j: j, e: e})
	}
	return st, out, nil
}
