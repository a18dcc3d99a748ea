package main

import (
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"
)

// dirJSON is `depcache dir --json`.
type dirJSON struct {
	Root   string `json:"root"`
	Exists bool   `json:"exists"`
}

func newDir(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "dir",
		Short: "Print the cache root (--root, else $DEPCACHE_ROOT, else $XDG_CACHE_HOME/depcache, else ~/.cache/depcache)",
		Long: `dir prints the absolute path of the cache root that the other commands use,
whether or not it exists yet. It creates nothing.`,
		Example: "  depcache dir\n  du -sh \"$(depcache dir)\"\n  DEPCACHE_ROOT=/mnt/cache depcache dir",
		Args:    exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := rootNotFile(g); err != nil {
				return err
			}
			abs, err := filepath.Abs(g.root)
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(g.stdout, dirJSON{Root: abs, Exists: fileExists(abs)})
			}
			_, err = fmt.Fprintln(g.stdout, abs)
			return err
		},
	}
}
