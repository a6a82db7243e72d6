// SPDX-License-Identifier: Apache-2.0

package driver_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// BenchmarkCreateDelete measures CreateVolume + DeleteVolume with pools of
// 10, 1,000 and 10,000 exports (embedded store; inventory already scanned)
// and reports p50 and p99 per pair.
func BenchmarkCreateDelete(b *testing.B) {
	for _, n := range []int{10, 1000, 10000} {
		b.Run(fmt.Sprintf("exports=%d", n), func(b *testing.B) {
			st, err := store.OpenBolt(filepath.Join(b.TempDir(), "store.db"))
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			exports := make([]store.Export, n)
			for i := range exports {
				exports[i] = store.Export{Name: fmt.Sprintf("e%05d", i), Size: uint64(1+i%7) << 30, Flags: 1}
			}
			c := driver.NewControllerService(driver.ControllerOptions{ScanMaxAge: time.Hour}, st, &fakeDiscoverer{exports: exports})
			ctx := context.Background()
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				start := time.Now()
				v, err := c.CreateVolume(ctx, createReq(fmt.Sprintf("pvc-%d", i), 3<<30, nil))
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}
