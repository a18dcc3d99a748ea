// Package manager drives the entries of one depcache root: it registers
// dependents, downloads (or pulls, or builds) what they need once across
// every process and host that shares the root, takes over from owners that
// died or stalled, publishes, and keeps the cache inside its budget.
//
// # Jobs
//
// A [Manager] is one process's view of a root. Its loop makes a pass every
// PollInterval (or at once when kicked): one read-modify-write of the state
// in which every entry goes through the pure [transitions.Step], and then
// the actions that pass decided (start a download, take one over, remove
// staging data, cancel a download) outside the lock. A sweep
// ([Manager.Sweep]) runs every CleanupInterval and after each publish by
// this manager: it reaps dependents that no longer hold their entries and
// evicts within the stored policy. [Manager.Verify], [Manager.Doctor] and
// [Manager.Rebuild] check and repair a root.
//
// # Guarantees
//
//   - One download per entry: only the owner of the current generation
//     downloads, into a staging directory of its own generation, and
//     publishes only if it still owns that generation when it commits
//     (the generation is the fencing token). A superseded owner never
//     writes into, publishes over or deletes its successor's files.
//   - No observer sees a READY entry whose content is not in place:
//     publish renames and then commits; eviction commits and then moves
//     the content into trash; a crash between the two leaves only an
//     orphan, which start-up reconciliation moves aside.
//   - No entry with a live dependent, or DOWNLOADING, pinned or younger
//     than min-age (judged on this process's own clock), is evicted.
//   - Nothing is deleted because something could not be parsed: a state
//     that does not parse stops the loop with an error and is kept.
//   - Every download writes at most what the stored budget can make room
//     for ([ErrTooLarge]).
//   - A disk filled to its last byte can still be freed: a removal, a
//     sweep that evicts, or a release gives up part of the file store's
//     disk reserve ([state.Reserver]) when its commit meets ENOSPC, and
//     fails wrapping [ErrDiskFull] only when the reserve ran out. A Get,
//     which frees nothing, never spends the reserve: on a full disk it
//     fails wrapping [ErrDiskFull].
//
// # Get, Wait and Release
//
// [Manager.Get] registers a dependent and returns the entry as it is,
// without waiting: it creates a DOWNLOADING entry for a missing key, and a
// running loop claims it. By default the dependent is bound to this process
// (reaped when it dies, or when its lease is not renewed for the dependent
// lease on other hosts' clocks); [Detached] makes it a named dependent that
// lives until released or until its TTL ([WithTTL]). [Manager.Wait] blocks
// until the entry is READY or FAILED (a [*FailedError]), the context ends,
// or the entry is gone ([ErrNotFound]); it needs a running loop
// ([ErrNotRunning] otherwise). [Manager.Release] removes a dependent; a
// download left without dependents is cancelled wherever it runs. A
// dependent bound to this process that disappears without its release is
// reported through Config.OnLost, and Wait returns [ErrDependentLost] while
// nothing of this process holds the entry.
//
// # Goroutines
//
// [Manager.Start] (or [Manager.Run]) reconciles the root, then runs the loop
// on one goroutine, which also sweeps. Beside it, one goroutine renews the
// leases of this process's dependents on its own ticker, so that a long
// sweep never lets them lapse. Each download runs on a goroutine of its own,
// with a progress reporter and a fetch goroutine under it; the loop joins
// all of them before Run returns (or Start's stop function returns), and a
// download interrupted that way hands its entry back unowned. Get, Wait and
// Release may be called from any goroutine.
//
// # Lock order
//
// The in-process trash mutex, then the state store's lock (held only for
// one read-modify-write, never across a download, an unpack or a delete),
// then the manager's own mutex. A store callback takes the manager's
// mutex; code that holds the manager's mutex never waits for the store.
//
// # Embedding
//
// One manager per process and root; a dependent per run:
//
//	m, err := manager.New(manager.Config{Root: root}) // Log, Metrics, policy: see Config
//	if err != nil {
//		return err
//	}
//	stop, err := m.Start(ctx) // reconciles the root, then runs the loop
//	if err != nil {
//		return err
//	}
//	defer stop() // unfinished downloads are handed back to others
//
//	key, err := manager.ParseKey("https://example.com/model.tar.gz", wantSHA256)
//	if err != nil {
//		return err // bad input: errors.Is(err, manager.ErrBadSource)
//	}
//	if _, err := m.Get(ctx, "run-42", key); err != nil { // bound to this process
//		return err
//	}
//	e, err := m.Wait(ctx, key) // one download across all processes; the others wait
//	if ctx.Err() == nil {
//		// Released once Wait has its answer. A shutdown (ctx ended) keeps
//		// the dependent: Release would drop a download nobody else waits
//		// for, with what it fetched, where stop hands it back resumable.
//		defer m.Release(context.WithoutCancel(ctx), "run-42", key)
//	}
//	var failed *manager.FailedError
//	if errors.As(err, &failed) {
//		return fmt.Errorf("dependency failed: %s", failed.Reason)
//	}
//	if err != nil {
//		return err // ctx ended, or the loop cannot read the state
//	}
//	path, err := m.Abs(e) // the content: a file, or a directory unpacked from an archive
//
// The runnable version is Example in example_test.go.
package manager
