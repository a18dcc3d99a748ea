package manager_test

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/depcache/depcache/state/rigtest"
)

// The Docker SDK stays in manager/docker: an embedder of manager that has
// no images links none of it (README, Layout). go list runs with the
// test's environment, GOFLAGS included, so it sees the build the test is.
func TestManagerDoesNotLinkDocker(t *testing.T) {
	goCmd, err := exec.LookPath("go")
	if err != nil {
		if rigtest.InCI() {
			t.Fatalf("CI=true but no go command on PATH: %v", err)
		}
		t.Skipf("skipping: no go command on PATH: %v", err)
	}
	deps := func(pkg string) (docker []string, n int) {
		t.Helper()
		cmd := exec.Command(goCmd, "list", "-deps", pkg)
		cmd.Env = os.Environ()
		out, err := cmd.Output()
		if err != nil {
			var stderr []byte
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = ee.Stderr
			}
			t.Fatalf("go list -deps %s: %v\n%s", pkg, err, stderr)
		}
		for _, p := range strings.Fields(string(out)) {
			n++
			if strings.HasPrefix(p, "github.com/docker/") {
				docker = append(docker, p)
			}
		}
		return docker, n
	}
	if docker, n := deps("."); len(docker) > 0 {
		t.Errorf("manager (%d packages) imports the Docker SDK: %v; it belongs in manager/docker", n, docker)
	}
	// The check sees the SDK where it is.
	if docker, _ := deps("./docker"); len(docker) == 0 {
		t.Error("go list -deps ./docker lists no github.com/docker/ package: the check would not see one")
	}
}
