// SPDX-License-Identifier: Apache-2.0

package kubetest

import (
	"errors"
	"net"
	"os"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/servers"
)

// TestStartRetriesTakenPort hands the first start a kube-apiserver port
// that is already bound: Start must notice the bind failure and come up on
// new ports instead of failing (the CI flake this guards against).
func TestStartRetriesTakenPort(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	calls := 0
	freePort = func() (int, error) {
		calls++
		if calls == 3 { // the first start's kube-apiserver port
			return taken.Addr().(*net.TCPAddr).Port, nil
		}
		return servers.FreePort()
	}
	defer func() { freePort = servers.FreePort }()
	c, err := Start("")
	if errors.Is(err, ErrMissing) && os.Getenv(RequireEnv) != "1" {
		t.Skip(err)
	}
	if err != nil {
		t.Fatalf("Start with a taken port: %v", err)
	}
	defer c.Stop()
	if calls != 6 {
		t.Errorf("ports picked: %d, want 6 (two starts)", calls)
	}
}
