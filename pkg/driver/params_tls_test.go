// SPDX-License-Identifier: Apache-2.0

package driver

import "testing"

func TestParseVolumeContextTLS(t *testing.T) {
	for _, tc := range []struct {
		value, want string
		ok          bool
	}{
		{"", TLSAuto, true}, // absent
		{TLSKernel, TLSKernel, true},
		{TLSAuto, TLSAuto, true},
		{TLSRelay, TLSRelay, true},
		{"Kernel", "", false},
		{"off", "", false},
	} {
		vc := map[string]string{KeyURI: "nbds://server/disk"}
		if tc.value != "" {
			vc[KeyTLS] = tc.value
		}
		p, err := ParseVolumeContext(vc)
		if tc.ok != (err == nil) {
			t.Errorf("%s=%q: err %v", KeyTLS, tc.value, err)
			continue
		}
		if tc.ok && p.TLSMode != tc.want {
			t.Errorf("%s=%q: mode %q, want %q", KeyTLS, tc.value, p.TLSMode, tc.want)
		}
	}
}
