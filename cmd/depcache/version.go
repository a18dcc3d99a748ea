package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// versionJSON is `depcache version --json`.
type versionJSON struct {
	Version  string `json:"version"`
	Revision string `json:"revision"`
	Time     string `json:"time"`
	Modified bool   `json:"modified"`
	Go       string `json:"go"`
}

// buildVersion reads the module version and the VCS stamp the Go toolchain
// wrote into the binary: a pseudo-version (v0.0.0-DATE-REVISION, +dirty
// with uncommitted changes) and the revision for a build from a git
// checkout, "(devel)" and no revision without VCS stamping
// (-buildvcs=false, or no checkout), v1.2.3 for `go install ...@v1.2.3`.
func buildVersion() versionJSON {
	v := versionJSON{Version: "(unknown)", Go: runtime.Version()}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if info.Main.Version != "" {
		v.Version = info.Main.Version
	}
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Revision = s.Value
		case "vcs.time":
			v.Time = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		}
	}
	return v
}

// versionString is the line of `depcache --version` and `depcache version`.
func versionString() string {
	v := buildVersion()
	s := v.Version
	if v.Revision != "" {
		s += " (" + v.Revision
		if v.Modified {
			s += ", modified"
		}
		s += ")"
	}
	return s + " " + v.Go
}

func newVersion(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "Print depcache's version and the VCS revision it was built from",
		Example: "  depcache version\n  depcache version --json | jq -r .revision\n  depcache --version",
		Args:    exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if g.json {
				return printJSON(g.stdout, buildVersion())
			}
			_, err := fmt.Fprintln(g.stdout, "depcache", versionString())
			return err
		},
	}
}

// rootExamples is `depcache --help`'s Examples.
const rootExamples = `  p=$(depcache get https://example.com/data.tar.gz)   # the content: a file, or the unpacked directory
  depcache get --dependent job-42 --ttl 24h docker://ubuntu:22.04
  depcache release --dependent job-42 docker://ubuntu:22.04
  depcache ls --sort size
  depcache gc --dry-run
  depcache ls -q --filter stage=FAILED --filter in-use=false | xargs -r depcache rm --dry-run
  depcache doctor
  depcache dir`
