package state

import (
	"fmt"
	"path"
	"time"
)

// Policy is the cleanup policy of a root. It is stored in the state file so
// that every worker sharing the root applies the same budget.
type Policy struct {
	// MaxSizeBytes is the byte budget; 0 means no budget.
	MaxSizeBytes int64 `json:"max_size_bytes,omitempty"`
	// HighWatermark and LowWatermark are percents of MaxSizeBytes: a sweep
	// starts when usage is above High and frees down to Low.
	HighWatermark int `json:"high_watermark_percent"`
	LowWatermark  int `json:"low_watermark_percent"`
	// MinFreeDiskBytes and MinFreeDiskPercent, when set, keep that much of
	// the root's filesystem free (statfs).
	MinFreeDiskBytes   int64 `json:"min_free_disk_bytes,omitempty"`
	MinFreeDiskPercent int   `json:"min_free_disk_percent,omitempty"`
	// MinAge: entries younger than this are never evicted.
	MinAge Duration `json:"min_age"`
	// MaxAge, when set, evicts unused entries not used for this long even
	// under budget.
	MaxAge Duration `json:"max_age,omitempty"`
	// Pins are key IDs or shell patterns (path.Match) on sources whose
	// entries are never evicted.
	Pins []string `json:"pins,omitempty"`
}

// DefaultPolicy is the policy of a root that has none stored.
func DefaultPolicy() Policy {
	return Policy{HighWatermark: 95, LowWatermark: 85, MinAge: Duration(2 * time.Minute)}
}

// Validate names the field and the value that is out of range.
func (p Policy) Validate() error {
	switch {
	case p.MaxSizeBytes < 0:
		return fmt.Errorf("max-size %d: must not be negative", p.MaxSizeBytes)
	case p.HighWatermark < 1 || p.HighWatermark > 100:
		return fmt.Errorf("high-watermark %d: must be in [1, 100]", p.HighWatermark)
	case p.LowWatermark < 0 || p.LowWatermark > p.HighWatermark:
		return fmt.Errorf("low-watermark %d: must be in [0, high-watermark %d]", p.LowWatermark, p.HighWatermark)
	case p.MinFreeDiskBytes < 0:
		return fmt.Errorf("min-free-disk %d: must not be negative", p.MinFreeDiskBytes)
	case p.MinFreeDiskPercent < 0 || p.MinFreeDiskPercent > 99:
		return fmt.Errorf("min-free-disk %d%%: must be in [0, 99]", p.MinFreeDiskPercent)
	case p.MinAge < 0:
		return fmt.Errorf("min-age %s: must not be negative", p.MinAge)
	case p.MaxAge < 0 || (p.MaxAge > 0 && p.MaxAge < p.MinAge):
		return fmt.Errorf("max-age %s: must be 0 (off) or at least min-age %s", p.MaxAge, p.MinAge)
	}
	for _, pin := range p.Pins {
		if err := CheckText("pin", pin); err != nil {
			return err
		}
		if _, err := path.Match(pin, ""); err != nil || pin == "" {
			return fmt.Errorf("pin %q: not a key ID or a valid pattern", pin)
		}
	}
	return nil
}

// Pinned reports whether the entry for k is pinned.
func (p Policy) Pinned(k Key) bool {
	for _, pin := range p.Pins {
		if pin == k.ID() || pin == k.Source {
			return true
		}
		if ok, _ := path.Match(pin, k.Source); ok {
			return true
		}
	}
	return false
}

// Duration is a time.Duration written as Go duration text ("2m0s").
type Duration time.Duration

// MarshalText writes the duration as text.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText reads Go duration text.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

func (d Duration) String() string { return time.Duration(d).String() }
