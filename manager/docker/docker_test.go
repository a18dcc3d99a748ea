package docker

import "testing"

// TestPermanentText: what an engine says of a pull that no retry changes,
// against what a retry may fix (a registry's 500 in the stream was
// permanent; a refused login of an engine before 23.0 was transient).
func TestPermanentText(t *testing.T) {
	for msg, want := range map[string]bool{
		"manifest for r/a:1 not found: manifest unknown: manifest unknown":                    true,
		"pull access denied for r/a, repository does not exist or may require 'docker login'": true,
		"Get \"https://r/v2/a/manifests/1\": no basic auth credentials":                       true,
		"unauthorized: authentication required":                                               true,
		"invalid reference format: repository name must be lowercase":                         true,
		"received unexpected HTTP status: 500 Internal Server Error":                          false,
		"read tcp 127.0.0.1:1->127.0.0.1:5000: read: connection reset by peer":                false,
		"Get \"http://r/v2/\": dial tcp 127.0.0.1:5000: connect: connection refused":          false,
		"error pulling image configuration: download failed after attempts=6: unexpected EOF": false,
	} {
		if got := permanentText(msg); got != want {
			t.Errorf("permanentText(%q) = %v, want %v", msg, got, want)
		}
	}
}
