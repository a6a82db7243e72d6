// SPDX-License-Identifier: Apache-2.0

package attach

// Negotiation for the kernel: dialling an export's connections and handing
// each to the kernel, TLS ones with their session in the kernel's TLS layer
// or through the relay.

import (
	"context"
	"fmt"
	"os"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/ktls"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// negotiated is the result of dialling an export for the kernel.
type negotiated struct {
	files  []*os.File
	relays []*relay  // relays[i] serves files[i] (TLS), or nil
	tls    []connTLS // tls[i] is how files[i] is encrypted
	info   nbd.ExportInfo
	// noKernelTLS says why kernel TLS was not even tried (TLSAuto on a
	// kernel without the tls ULP); the sessions were dialled for the relay.
	noKernelTLS error
}

// connTLS is how one connection handed to the kernel is encrypted.
type connTLS struct {
	// mode is driver.TLSKernel or driver.TLSRelay; empty for plaintext.
	mode string
	// fallback says why kernel TLS was not used (TLSAuto only).
	fallback string
}

// summarizeTLS is a volume's TLS mode from its connections': TLSKernel or
// TLSRelay when they all agree, TLSMixed when only some go through the
// relay (so that no relayed connection hides behind another's mode), and
// why the relay is used.
func summarizeTLS(conns []connTLS) (mode, reason string) {
	var kernel, relay int
	for _, c := range conns {
		switch c.mode {
		case driver.TLSKernel:
			kernel++
		case driver.TLSRelay:
			relay++
			if reason == "" {
				reason = c.fallback
			}
		}
	}
	switch {
	case relay == 0 && kernel == 0:
		return "", ""
	case relay == 0:
		return driver.TLSKernel, ""
	case kernel == 0:
		return driver.TLSRelay, reason
	}
	return driver.TLSMixed, fmt.Sprintf("%d of %d connections go through the relay: %s", relay, relay+kernel, reason)
}

// tlsOf returns how connection i is encrypted.
func (n *negotiated) tlsOf(i int) connTLS {
	if i >= len(n.tls) {
		return connTLS{}
	}
	return n.tls[i]
}

// takeRelay hands relay i to the caller (closeAll no longer closes it).
func (n *negotiated) takeRelay(i int) *relay {
	if i >= len(n.relays) {
		return nil
	}
	r := n.relays[i]
	n.relays[i] = nil
	return r
}

// closeAll closes the sockets and relays nobody took.
func (n *negotiated) closeAll() {
	for _, f := range n.files {
		f.Close()
	}
	n.files = nil
	for _, r := range n.relays {
		if r != nil {
			r.close()
		}
	}
	n.relays = nil
}

// dial negotiates up to limit connections (more than one only if the
// export allows multi-conn and the volume asks for them) with the kernel
// profile and returns a socket per connection.
func dial(ctx context.Context, spec driver.AttachSpec, limit int) (*negotiated, error) {
	opts := tlsOpts(spec)
	n := &negotiated{}
	switch kernelTLSMode(spec) {
	case driver.TLSKernel:
		opts = append(opts, nbd.WithKernelTLS(false))
	case driver.TLSAuto:
		// Where the kernel has no tls ULP the session goes to the relay
		// anyway: no reason to prefer TLS 1.2 (which shows the client
		// certificate in clear) or to record it.
		if n.noKernelTLS = kernelTLSAvailable(); n.noKernelTLS == nil {
			opts = append(opts, nbd.WithKernelTLS(false))
		}
	}
	ok := false
	defer func() {
		if !ok {
			n.closeAll()
		}
	}()
	want := 1
	for i := 0; i < want; i++ {
		c, err := nbd.Dial(ctx, spec.URI, opts...)
		if err != nil {
			return nil, err
		}
		info := c.Export()
		if i == 0 {
			n.info = info
			if spec.Connections > 1 && info.Flags.Has(nbd.FlagCanMultiConn) {
				want = min(spec.Connections, limit)
			}
		} else if info.Size != n.info.Size || info.Flags != n.info.Flags {
			c.Close()
			return nil, fmt.Errorf("connection %d saw size %d flags %v, connection 1 size %d flags %v", i+1, info.Size, info.Flags, n.info.Size, n.info.Flags)
		}
		if info.TLS {
			if err := n.addTLS(ctx, spec, c); err != nil {
				return nil, err
			}
			continue
		}
		f, err := c.File()
		c.Close()
		if err != nil {
			return nil, err
		}
		n.files = append(n.files, f)
		n.relays = append(n.relays, nil)
		n.tls = append(n.tls, connTLS{})
	}
	ok = true
	return n, nil
}

// kernelTLSMode returns the volume's TLS mode (TLSAuto when unset).
func kernelTLSMode(spec driver.AttachSpec) string {
	if spec.TLSMode == "" {
		return driver.TLSAuto
	}
	return spec.TLSMode
}

// addTLS gives the kernel the TLS connection c: its own socket with the
// session moved into the kernel's TLS layer (kTLS), or, where that is
// impossible and the volume allows it, one end of a socket pair that a
// relay in this process encrypts. c is consumed either way. A TLS session
// never reaches the kernel as plaintext: File refuses TLS connections, and
// a failed offload either leaves the session intact for the relay or is
// redialled.
func (n *negotiated) addTLS(ctx context.Context, spec driver.AttachSpec, c *nbd.Conn) error {
	mode := kernelTLSMode(spec)
	fallback := ""
	if n.noKernelTLS != nil {
		fallback = n.noKernelTLS.Error()
	} else if mode != driver.TLSRelay {
		f, err := kernelTLS(c)
		if err == nil {
			c.Close()
			n.files = append(n.files, f)
			n.relays = append(n.relays, nil)
			n.tls = append(n.tls, connTLS{mode: driver.TLSKernel})
			return nil
		}
		if mode == driver.TLSKernel {
			c.Close()
			return fmt.Errorf("%w: %s=%s: %w", nbd.ErrPlatform, driver.KeyTLS, driver.TLSKernel, err)
		}
		fallback = err.Error()
		if c.InKernel() {
			// The session is (partly) the kernel's and never this
			// process's again; a fresh one goes to the relay.
			was := c.Export()
			c.Close()
			if c, err = nbd.Dial(ctx, spec.URI, tlsOpts(spec)...); err != nil {
				return err
			}
			now := c.Export()
			switch {
			case !now.TLS:
				c.Close()
				return fmt.Errorf("%w: the redialled connection is not TLS", nbd.ErrTLSUnavailable)
			case now.Size != was.Size || now.Flags != was.Flags:
				c.Close()
				return fmt.Errorf("redialled connection saw size %d flags %v, the first size %d flags %v", now.Size, now.Flags, was.Size, was.Flags)
			}
		}
	}
	// The kernel gets a socket pair, and this process encrypts.
	st, err := c.Stream()
	if err != nil {
		c.Close()
		return err
	}
	r, err := newRelay(st)
	if err != nil {
		st.Close()
		return err
	}
	n.relays = append(n.relays, r)
	n.files = append(n.files, r.kernel)
	n.tls = append(n.tls, connTLS{mode: driver.TLSRelay, fallback: fallback})
	return nil
}

// kernelTLSAvailable is ktls.Available (a seam for tests).
var kernelTLSAvailable = ktls.Available

// kernelTLS is Conn.KernelTLS (a seam for tests).
var kernelTLS = func(c *nbd.Conn) (*os.File, error) {
	f, _, err := c.KernelTLS()
	return f, err
}

func tlsOpts(spec driver.AttachSpec) []nbd.Option {
	if spec.TLS == nil {
		return nil
	}
	return []nbd.Option{nbd.WithTLS(spec.TLS)}
}
