// SPDX-License-Identifier: Apache-2.0

package e2e

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// TestExpandVolume: what an admin does to give a volume more room. The
// export is grown on the NBD server (E2E_GROW_EXPORT_CMD, run with EXPORT
// and SIZE in its environment), then the claim is edited while a pod has
// it mounted. csi-resizer (ControllerExpandVolume asks the server) and the
// kubelet (NodeExpandVolume resizes the connected kernel device and grows
// ext4 online) do the rest: the pod sees the bigger filesystem with its
// data, and the claim reports the new capacity with no condition left.
func TestExpandVolume(t *testing.T) {
	need(t)
	grow := os.Getenv("E2E_GROW_EXPORT_CMD")
	if grow == "" {
		t.Skip("E2E_GROW_EXPORT_CMD not set")
	}
	ctx := context.Background()
	// The export grows to exportSize (truncate's units: 1 GiB) and the
	// claim asks for newSize.
	const exportSize, newSize = "1G", "1Gi"
	// 1 GiB of ext4 has about 1,000,000 KiB of blocks; the 512 MiB the
	// pool's exports start with, less than 500,000.
	const grownKiB = 900000
	// A class of its own: the grown export goes back to that pool, never
	// to the one the other tests and the upstream suite claim from.
	pvcOf(t, env("E2E_GROW_STORAGE_CLASS", "nbd-e2e-grow"), "grow", false)
	tok := token()
	pod(t, "app", "grow", false, "", fmt.Sprintf(`set -e
echo %s > /data/token && sync
size() { df -kP /data | awk 'NR==2 {print $2}'; }
echo "before $(size) KiB"
while [ "$(size)" -lt %d ]; do sleep 2; done
echo "after $(size) KiB"
cat /data/token`, tok, grownKiB))
	waitPod(t, "app", corev1.PodRunning, startTimeout)

	claim, err := cs.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, "grow", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pv, err := cs.CoreV1().PersistentVolumes().Get(ctx, claim.Spec.VolumeName, metav1.GetOptions{})
	if err != nil || pv.Spec.CSI == nil {
		t.Fatalf("PV of grow: %v", err)
	}
	u, err := url.Parse(pv.Spec.CSI.VolumeAttributes["uri"])
	if err != nil || strings.Trim(u.Path, "/") == "" {
		t.Fatalf("export of %s: uri %q: %v", pv.Name, pv.Spec.CSI.VolumeAttributes["uri"], err)
	}
	export := strings.Trim(u.Path, "/")
	t.Logf("volume %s is export %s (%s)", pv.Spec.CSI.VolumeHandle, export, claim.Status.Capacity.Storage())

	cmd := exec.Command("sh", "-c", grow)
	cmd.Env = append(os.Environ(), "EXPORT="+export, "SIZE="+exportSize)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("grow export %s: %v\n%s", export, err, out)
	}
	patch := fmt.Sprintf(`{"spec":{"resources":{"requests":{"storage":%q}}}}`, newSize)
	if _, err := cs.CoreV1().PersistentVolumeClaims(namespace).Patch(ctx, "grow", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatalf("expand claim: %v", err)
	}
	start := time.Now()
	waitPod(t, "app", corev1.PodSucceeded, 5*time.Minute)
	out := logs(t, "app")
	t.Logf("grown online in %v:\n%s", time.Since(start).Round(time.Second), strings.TrimSpace(out))
	if !strings.Contains(out, tok) {
		t.Errorf("the data did not survive the expansion: log %q, want %s", out, tok)
	}
	want := resource.MustParse(newSize)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		claim, err = cs.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, "grow", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if c := claim.Status.Capacity.Storage(); c.Cmp(want) >= 0 && len(claim.Status.Conditions) == 0 {
			t.Logf("claim capacity %s", c)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("claim after expansion: capacity %s, conditions %v; events:\n%s",
				claim.Status.Capacity.Storage(), claim.Status.Conditions, events("grow"))
		}
		time.Sleep(2 * time.Second)
	}
}
