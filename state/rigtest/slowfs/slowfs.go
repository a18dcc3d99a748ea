// Package slowfs serves a real FUSE filesystem that passes every operation
// through to a directory after a delay, and can hold a chosen operation until
// the test releases it: the slow or hung shared filesystem of the fault
// tests. It is test infrastructure; nothing in depcache imports it.
//
// Give each simulated host its own Mount of the shared directory, as each NFS
// client has its own: a held operation keeps the kernel's lock on its
// directory, so one mount shared by two hosts would hang both.
package slowfs

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/depcache/depcache/state/rigtest"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Op names a filesystem operation.
type Op string

// The operations that can be delayed and held.
const (
	Lookup  Op = "lookup"
	Getattr Op = "getattr"
	Setattr Op = "setattr"
	Create  Op = "create"
	Open    Op = "open"
	Read    Op = "read"
	Write   Op = "write"
	Flush   Op = "flush"
	Fsync   Op = "fsync"
	Mkdir   Op = "mkdir"
	Unlink  Op = "unlink"
	Rmdir   Op = "rmdir"
	Rename  Op = "rename"
	Link    Op = "link"
	Readdir Op = "readdir"
)

// FS is a mounted slow filesystem.
type FS struct {
	// Mnt is where the filesystem is mounted.
	Mnt string

	server *fuse.Server
	delay  atomic.Int64 // every operation
	sync   atomic.Int64 // fsync, on top of delay

	t     testing.TB
	mu    sync.Mutex
	holds []*Hold
	count map[Op]int
}

// maxHold bounds a hold that the test forgot to release: a process blocked
// in a FUSE request cannot even be killed, so the hold gives up and fails
// the test instead.
const maxHold = time.Minute

// Hold is an operation held until Release.
type Hold struct {
	op      Op
	name    string
	hit     chan struct{}
	release chan struct{}
	once    sync.Once
	taken   bool
}

// Mount serves dir at a new directory under t's temporary directory and
// unmounts it when t ends. Without FUSE (no /dev/fuse, not root) it skips
// t, or fails it under CI.
func Mount(t testing.TB, dir string) *FS {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		rigtest.Missing(t, "FUSE (/dev/fuse) for the slow filesystem")
	}
	mnt := filepath.Join(t.TempDir(), "slow")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	f := &FS{Mnt: mnt, t: t, count: map[Op]int{}}
	root, err := fs.NewLoopbackRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	opts := &fs.Options{MountOptions: fuse.MountOptions{FsName: "slowfs", Name: "slowfs", DirectMount: true, AllowOther: os.Geteuid() == 0}}
	server, err := fs.Mount(mnt, &node{LoopbackNode: root.(*fs.LoopbackNode), fs: f}, opts)
	if err != nil {
		rigtest.Missing(t, fmt.Sprintf("a FUSE mount for the slow filesystem (%v)", err))
	}
	f.server = server
	t.Cleanup(func() {
		f.releaseAll()
		if err := server.Unmount(); err != nil {
			t.Errorf("unmounting %s: %v", mnt, err)
		}
	})
	return f
}

// SetDelay makes every operation take d more, and fsync sync more again.
func (f *FS) SetDelay(d, sync time.Duration) {
	f.delay.Store(int64(d))
	f.sync.Store(int64(sync))
}

// HoldNext holds the next op on an entry called name (a base name; one
// ending in "*" matches every name it begins), from whichever process,
// until Release.
func (f *FS) HoldNext(op Op, name string) *Hold {
	h := &Hold{op: op, name: name, hit: make(chan struct{}), release: make(chan struct{})}
	f.mu.Lock()
	f.holds = append(f.holds, h)
	f.mu.Unlock()
	return h
}

// Hit is closed once the operation arrived and is held.
func (h *Hold) Hit() <-chan struct{} { return h.hit }

// Release lets the held operation (or the next one, if none arrived yet)
// proceed.
func (h *Hold) Release() { h.once.Do(func() { close(h.release) }) }

// Count returns how many operations of kind op were served.
func (f *FS) Count(op Op) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.count[op]
}

func (f *FS) releaseAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, h := range f.holds {
		h.Release()
	}
}

// pass delays an operation and holds it if a Hold matches it.
func (f *FS) pass(ctx context.Context, op Op, name string) {
	d := time.Duration(f.delay.Load())
	if op == Fsync {
		d += time.Duration(f.sync.Load())
	}
	f.mu.Lock()
	f.count[op]++
	var held *Hold
	for _, h := range f.holds {
		if !h.taken && h.op == op && (h.name == name || strings.HasSuffix(h.name, "*") && strings.HasPrefix(name, strings.TrimSuffix(h.name, "*"))) {
			h.taken, held = true, h
			break
		}
	}
	f.mu.Unlock()
	if d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done(): // the caller was interrupted
		}
		t.Stop()
	}
	if held != nil {
		close(held.hit)
		select {
		case <-held.release:
		case <-time.After(maxHold):
			f.t.Errorf("slowfs: %s of %s held for %s and never released", op, name, maxHold)
		}
	}
}

// node is a loopback node whose operations go through pass first.
type node struct {
	*fs.LoopbackNode
	fs *FS
}

var (
	_ fs.NodeWrapChilder = (*node)(nil)
	_ fs.NodeFsyncer     = (*node)(nil)
	_ fs.NodeReader      = (*node)(nil)
	_ fs.NodeWriter      = (*node)(nil)
	_ fs.NodeFlusher     = (*node)(nil)
)

func (n *node) WrapChild(_ context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	return &node{LoopbackNode: ops.(*fs.LoopbackNode), fs: n.fs}
}

func (n *node) name() string { return n.EmbeddedInode().Path(nil) }

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	n.fs.pass(ctx, Lookup, name)
	return n.LoopbackNode.Lookup(ctx, name, out)
}

func (n *node) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fs.pass(ctx, Getattr, filepath.Base(n.name()))
	return n.LoopbackNode.Getattr(ctx, f, out)
}

func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	n.fs.pass(ctx, Setattr, filepath.Base(n.name()))
	return n.LoopbackNode.Setattr(ctx, f, in, out)
}

func (n *node) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	n.fs.pass(ctx, Create, name)
	return n.LoopbackNode.Create(ctx, name, flags, mode, out)
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	n.fs.pass(ctx, Open, filepath.Base(n.name()))
	return n.LoopbackNode.Open(ctx, flags)
}

func (n *node) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	n.fs.pass(ctx, Read, filepath.Base(n.name()))
	if r, ok := f.(fs.FileReader); ok {
		return r.Read(ctx, dest, off)
	}
	return nil, syscall.ENOTSUP
}

func (n *node) Write(ctx context.Context, f fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	n.fs.pass(ctx, Write, filepath.Base(n.name()))
	if w, ok := f.(fs.FileWriter); ok {
		return w.Write(ctx, data, off)
	}
	return 0, syscall.ENOTSUP
}

func (n *node) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno {
	n.fs.pass(ctx, Flush, filepath.Base(n.name()))
	if fl, ok := f.(fs.FileFlusher); ok {
		return fl.Flush(ctx)
	}
	return 0
}

func (n *node) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	n.fs.pass(ctx, Fsync, filepath.Base(n.name()))
	if s, ok := f.(fs.FileFsyncer); ok {
		return s.Fsync(ctx, flags)
	}
	return 0 // a directory: the loopback has nothing to sync
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	n.fs.pass(ctx, Mkdir, name)
	return n.LoopbackNode.Mkdir(ctx, name, mode, out)
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	n.fs.pass(ctx, Unlink, name)
	return n.LoopbackNode.Unlink(ctx, name)
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	n.fs.pass(ctx, Rmdir, name)
	return n.LoopbackNode.Rmdir(ctx, name)
}

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	n.fs.pass(ctx, Rename, newName)
	if p, ok := newParent.(*node); ok {
		newParent = p.LoopbackNode
	}
	return n.LoopbackNode.Rename(ctx, name, newParent, newName, flags)
}

func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	n.fs.pass(ctx, Link, name)
	if t, ok := target.(*node); ok {
		target = t.LoopbackNode
	}
	return n.LoopbackNode.Link(ctx, target, name, out)
}

func (n *node) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	n.fs.pass(ctx, Readdir, filepath.Base(n.name()))
	return n.LoopbackNode.Readdir(ctx)
}
