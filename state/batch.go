package state

import (
	"context"
	"sync"
)

// Group commit. Operations of one process that arrive while another holds
// the state lock are applied together by the next holder, in one lock hold
// and one commit: a worker running many jobs pays one durable commit per
// batch instead of one per operation, and its goroutines stop convoying on
// the lock file.

type batchOp struct {
	fn   func(*State) (bool, error)
	err  error
	done chan struct{}
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
// an error (as the pure transitions do). If the batch's commit fails, every
// operation in it gets that error and none is committed.
//
// Once a batch has taken the operation, it is carried out even if ctx ends:
// returning early would leave the caller unsure whether it was committed.
func (s *Store) UpdateBatched(ctx context.Context, fn func(*State) (changed bool, err error)) error {
	b := &s.batch
	op := &batchOp{fn: fn, done: make(chan struct{})}
	b.mu.Lock()
	b.queue = append(b.queue, op)
	b.mu.Unlock()
	for {
		select {
		case <-op.done:
			return op.err
		case b.leader <- struct{}{}:
			// With the token, op is either done or still queued: no
			// batch is in flight. Lead only if it is queued.
			select {
			case <-op.done:
			default:
				s.lead(ctx, op)
			}
			<-b.leader
		case <-ctx.Done():
			if b.withdraw(op) {
				return ctx.Err()
			}
			<-op.done
			return op.err
		}
	}
}

// lead takes the lock and applies every queued operation. If the lock or
// the read fails before the queue is taken, only own fails: the others elect
// another leader.
func (s *Store) lead(ctx context.Context, own *batchOp) {
	var taken []*batchOp
	err := s.Update(ctx, func(st *State) (bool, error) {
		taken = s.batch.take()
		changed := false
		for _, op := range taken {
			c, err := op.fn(st)
			op.err = err
			changed = changed || (c && err == nil)
		}
		return changed, nil
	})
	if taken == nil {
		if s.batch.withdraw(own) {
			own.err = err
			close(own.done)
		}
		return
	}
	for _, op := range taken {
		if err != nil && op.err == nil {
			op.err = err
		}
		close(op.done)
	}
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
