package state

import (
	"context"
	"errors"
	"sync"
)

// Group commit. Operations of one process that arrive while another holds
// the state lock are applied together by the next holder, in one lock hold
// and one commit: a worker running many jobs pays one durable commit per
// batch instead of one per operation, and its goroutines stop convoying on
// the lock file.

type batchOp struct {
	fn func(*State) (bool, error)
	// ids are the entries fn sees (UpdateEntries); whole: all of them.
	ids      []string
	whole    bool
	err      error
	panicked any // what fn panicked with, re-raised in its caller
	done     chan struct{}
	// prop is fn as data (Propose): while the lock is taken, the leader
	// leaves it for the holder to apply (combine.go). result is what its
	// Applier returned, whoever applied it.
	prop   *Proposal
	result []byte
	// declined: a holder declined prop; apply it here without proposing.
	declined bool
}

type batcher struct {
	mu     sync.Mutex
	queue  []*batchOp
	leader chan struct{} // holds a token while some goroutine leads a batch
}

// UpdateBatched is Update for operations that may share a lock hold and a
// commit with other UpdateBatched calls of this store that are waiting at
// the same time. fn runs under the lock on a state that earlier operations
// of the batch may have changed, and must leave st unchanged when it returns
// an error (as the pure transitions do). An operation whose fn fails gets
// its own error; if the batch's commit fails, every other operation in it
// gets that error, and none is committed. If fn panics, nothing of the batch
// is committed, the others get an error and the panic is raised again in
// fn's caller.
//
// Once a batch has taken the operation, it is carried out even if ctx ends:
// returning early would leave the caller unsure whether it was committed.
func (s *Store) UpdateBatched(ctx context.Context, fn func(*State) (changed bool, err error)) error {
	return s.batched(ctx, &batchOp{fn: fn, whole: true})
}

// UpdateEntries is UpdateBatched with fn restricted to the entries ids: it
// reads and writes only the shards that hold them (and the manifest), so
// that its cost does not grow with the number of entries.
func (s *Store) UpdateEntries(ctx context.Context, ids []string, fn func(*Txn) (bool, error)) error {
	return s.batched(ctx, &batchOp{fn: EntriesFunc(ids, fn), ids: ids})
}

func (s *Store) batched(ctx context.Context, op *batchOp) error {
	b := &s.batch
	op.done = make(chan struct{})
	b.mu.Lock()
	b.queue = append(b.queue, op)
	b.mu.Unlock()
	for {
		select {
		case <-op.done:
			if op.panicked != nil {
				panic(op.panicked)
			}
			return op.err
		case b.leader <- struct{}{}:
			// With the token, op is either done or still queued: no
			// batch is in flight. Lead only if it is queued.
			func() {
				defer func() { <-b.leader }()
				select {
				case <-op.done:
				default:
					s.lead(ctx, op)
				}
			}()
		case <-ctx.Done():
			if b.withdraw(op) {
				return ctx.Err()
			}
			<-op.done
			if op.panicked != nil {
				panic(op.panicked)
			}
			return op.err
		}
	}
}

// lead takes the lock and applies every queued operation. If the lock or
// the read fails before the queue is taken, only own fails: the others elect
// another leader. While it waits for the lock, own's proposal (if it has
// one) waits in the spool for another process's hold to apply it; and the
// hold that lead takes applies the proposals other processes left there.
func (s *Store) lead(ctx context.Context, own *batchOp) {
	var taken []*batchOp
	var svs []*served
	var pd *pending
	if own.prop != nil && !own.declined && s.spool() != "" {
		pd = &pending{s: s, p: own.prop}
		defer pd.close()
	}
	defer func() {
		// Whatever happened, every taken operation ends: a caller must
		// never wait on a batch that is gone.
		for _, op := range taken {
			close(op.done)
		}
	}()
	settled := false // own was answered by another holder
	need := func() ([]string, bool) {
		// With the lock held: any holder that claimed own's proposal is
		// done with it, answered or gone.
		if pd != nil && !pd.withdraw() {
			if pd.read(0) {
				if res, applied, err := pd.answer(); applied && s.batch.withdraw(own) {
					own.result, own.err, settled = res, err, true
					s.comb.answered.Add(1)
					s.told("answered")
				}
			} else {
				own.prop.Again = true
			}
		}
		pd = nil // answered, withdrawn or to apply here: nothing to wait for
		// Taken with the lock held, so that every operation queued while
		// the lock was awaited joins this batch.
		taken = s.batch.take()
		svs = s.claim()
		var ids []string
		whole := false
		for _, op := range taken {
			whole = whole || op.whole
			ids = append(ids, op.ids...)
		}
		for _, sv := range svs {
			ids = append(ids, sv.p.IDs...)
		}
		if whole {
			return nil, true
		}
		return ids, false
	}
	hooks := txHooks{after: func(committed bool) { s.answer(svs, committed) }}
	if pd != nil {
		hooks.wait = pd.wait
	}
	var err error
	for tries := 0; ; tries++ {
		err = s.transact(ctx, hooks, need, func(st *State) (bool, error) {
			changed := false
			for _, op := range taken {
				c, p, err := runOp(op.fn, st)
				if p != nil {
					op.panicked = p
					return false, errBatchPanic
				}
				op.err = err
				changed = changed || (c && err == nil)
			}
			for _, sv := range svs {
				changed = sv.run(st) || changed
			}
			return changed, nil
		})
		if taken != nil || settled || err == errAnswered || pd == nil || pd.withdraw() || tries == 2 {
			break
		}
		// The lock was not had (ctx ended, or it failed), and a holder
		// has claimed own's proposal meanwhile: its outcome is not known
		// until that holder is done. Wait for it, whatever ctx says.
		ctx = context.WithoutCancel(ctx)
	}
	if err == errAnswered {
		res, applied, aerr := pd.answer()
		if !applied {
			// Declined: lead again and apply it here.
			own.declined = true
			return
		}
		if s.batch.withdraw(own) {
			own.result, own.err = res, aerr
			s.comb.answered.Add(1)
			s.told("answered")
			close(own.done)
		}
		return
	}
	if settled {
		close(own.done)
	}
	if taken == nil {
		if !settled && s.batch.withdraw(own) {
			own.err = err
			close(own.done)
		}
		return
	}
	for _, op := range taken {
		if err != nil && op.err == nil && op.panicked == nil {
			op.err = err
		}
	}
}

var errBatchPanic = errors.New("state: an operation batched with this one panicked; nothing was committed")

func runOp(fn func(*State) (bool, error), st *State) (changed bool, panicked any, err error) {
	defer func() {
		if p := recover(); p != nil {
			panicked = p
		}
	}()
	changed, err = fn(st)
	return changed, nil, err
}

func (b *batcher) take() []*batchOp {
	b.mu.Lock()
	defer b.mu.Unlock()
	q := b.queue
	b.queue = nil
	return q
}

// withdraw removes op from the queue; false if a batch has taken it.
func (b *batcher) withdraw(op *batchOp) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, o := range b.queue {
		if o == op {
			b.queue = append(b.queue[:i], b.queue[i+1:]...)
			return true
		}
	}
	return false
}
