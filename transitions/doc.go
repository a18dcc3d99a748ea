// Package transitions is depcache's state machine for one entry, as pure
// functions: (entry, what this manager observed, now) → (new entry,
// actions). It does no I/O, reads no clock and starts nothing; the manager
// carries out the actions it returns.
//
// Stages: an entry is DOWNLOADING (one owner fetches it, everyone else
// waits), READY (content published) or FAILED (the last attempt gave up).
// The rules, each in one function:
//
//   - [Request]: a Get registers a dependent; a missing entry is created
//     DOWNLOADING without an owner; a FAILED entry past its cool-down is
//     retried.
//   - [Release]: a dependent leaves; a DOWNLOADING entry with no dependents
//     left is removed, which cancels its download.
//   - [Step]: the periodic rule. Claim an unowned download (generation + 1);
//     wait while its owner is alive and makes progress; take over when the
//     owner is provably dead or its progress stayed unchanged for the
//     download timeout on this manager's clock; prune FAILED entries after a
//     cool-down that doubles with every failure of the key.
//   - [Report], [Publish], [Fail]: the owner's events. Each is fenced: it
//     applies only if the entry still has this owner and this generation,
//     and otherwise returns [ErrFenced], so a superseded owner can never
//     clobber the result.
//
// Time: "now" is the manager's reading of its own clock. A stall is judged
// only from values this manager watched stay unchanged (see [View]), never by
// comparing a timestamp another host wrote. Cool-downs use the FAILED
// entry's recorded time: a skewed clock only shifts a retry, it cannot make
// two owners.
package transitions
