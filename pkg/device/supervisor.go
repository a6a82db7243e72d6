// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
)

// Reconnector is what a Supervisor needs from the kernel side; *Netlink
// implements it.
type Reconnector interface {
	// WatchLinkDead delivers indexes of devices whose link died (AnyIndex:
	// notifications may have been lost) until ctx ends.
	WatchLinkDead(ctx context.Context) (<-chan uint32, error)
	// Reconfigure hands new sockets to the device.
	Reconfigure(ctx context.Context, index uint32, rc Reconfig) error
	// Status lists devices with the kernel's connected flag.
	Status(ctx context.Context) ([]Status, error)
}

var _ Reconnector = (*Netlink)(nil)

// RedialFunc connects to the export again and negotiates it for the kernel,
// returning one socket per connection plus the size and transmission flags
// the server reported. The Supervisor owns the returned files and closes
// them.
type RedialFunc func(ctx context.Context) (sockets []*os.File, sizeBytes uint64, flags uint16, err error)

// SupervisorConfig describes one supervised device.
type SupervisorConfig struct {
	// Index is the supervised device, N in /dev/nbdN.
	Index uint32
	// BackendID is the device's backend identifier, which RECONFIGURE
	// must quote.
	BackendID string
	// SizeBytes is the export size reported when the device was attached
	// (Device.SizeBytes will do). A redialled export with fewer of the
	// 512-byte sectors the device addresses is refused (a different or
	// shrunk disk under the same device would corrupt data); a grown one is
	// accepted and the device keeps its size. After a resize, tell the
	// Supervisor with SetExport.
	SizeBytes uint64
	// ServerFlags are the transmission flags the export reported at
	// attach (not including a READ_ONLY added by Config.ReadOnly). They
	// are compared on the bits the kernel acts on (HAS_FLAGS, READ_ONLY,
	// SEND_FLUSH, SEND_FUA, ROTATIONAL, SEND_TRIM, SEND_WRITE_ZEROES,
	// CAN_MULTI_CONN); other changes are accepted.
	ServerFlags uint16
	// DeadConnTimeout is the reconnect window after a dead link is
	// reported; use the device's Config.DeadConnTimeout, after which the
	// kernel fails waiting I/O anyway. Must be positive.
	DeadConnTimeout time.Duration
	// Redial reconnects; required.
	Redial RedialFunc
	// PollInterval is how often the device's STATUS is checked (to notice
	// that it was disconnected); 0 means 10 s.
	PollInterval time.Duration
	// MinBackoff and MaxBackoff bound the delay between redial attempts;
	// 0 means 100 ms and 2 s.
	MinBackoff, MaxBackoff time.Duration
	// OnEvent, if set, receives every Event, synchronously from Run's
	// goroutine; it must not block for long.
	OnEvent func(Event)
}

// EventKind classifies a supervisor Event.
type EventKind int

const (
	// EventLinkDead: the kernel reported the device's link dead (or
	// notifications were lost and the device is checked as if it had).
	EventLinkDead EventKind = iota + 1
	// EventRedialFailed: one redial attempt failed (Err).
	EventRedialFailed
	// EventExportChanged: the redialled export differs in size or flags;
	// its sockets were refused (Err wraps ErrExportChanged).
	EventExportChanged
	// EventReconfigureFailed: the kernel refused the new sockets (Err).
	EventReconfigureFailed
	// EventReconnected: the device has its new sockets.
	EventReconnected
	// EventGaveUp: the reconnect window expired or a permanent error
	// occurred (Err); Run returns it.
	EventGaveUp
	// EventDeviceGone: STATUS says the device is no longer connected; Run
	// returns ErrDeviceGone.
	EventDeviceGone
	// EventStatusFailed: a STATUS poll failed (Err); supervision goes on.
	EventStatusFailed
	// EventWatching: the LINK_DEAD subscription is in place; links that
	// die from now on are noticed.
	EventWatching
	// EventTLSRelay: a TLS connection was handed over through the
	// userspace relay because the kernel could not take the TLS session
	// (Err says why); emitted by pkg/attach.
	EventTLSRelay

	endEventKinds // keep last: EventKinds lists the kinds before it
)

// EventKinds lists every kind, so that a counter per kind can start at
// zero (a counter series that first appears at 1 has no increase to alert
// on).
func EventKinds() []EventKind {
	kinds := make([]EventKind, 0, endEventKinds-EventLinkDead)
	for k := EventLinkDead; k < endEventKinds; k++ {
		kinds = append(kinds, k)
	}
	return kinds
}

// String returns the kind's name, e.g. "link-dead".
func (k EventKind) String() string {
	switch k {
	case EventLinkDead:
		return "link-dead"
	case EventRedialFailed:
		return "redial-failed"
	case EventExportChanged:
		return "export-changed"
	case EventReconfigureFailed:
		return "reconfigure-failed"
	case EventReconnected:
		return "reconnected"
	case EventGaveUp:
		return "gave-up"
	case EventDeviceGone:
		return "device-gone"
	case EventStatusFailed:
		return "status-failed"
	case EventWatching:
		return "watching"
	case EventTLSRelay:
		return "tls-relay-fallback"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is something a Supervisor observed or did.
type Event struct {
	// Kind says what happened.
	Kind EventKind
	// Index is the supervised device.
	Index uint32
	// Attempt is the redial attempt (from 1) for redial-related events.
	Attempt int
	// Err is the cause for failure kinds.
	Err error
	// Time is when the event was reported.
	Time time.Time
}

// Supervisor keeps a netlink device connected across server restarts and
// network failures: on LINK_DEAD for its device it redials with backoff and
// hands the new sockets to the kernel (RECONFIGURE) before the device's
// dead-connection timeout fails the waiting I/O. It also polls STATUS to
// notice that the device has gone. It does not log; it reports Events.
//
// For requests in flight when the link dies to be retried on the new
// connection the device needs a non-zero Config.Timeout (see there).
type Supervisor struct {
	r   Reconnector
	cfg SupervisorConfig

	mu    sync.Mutex
	size  uint64
	flags uint16
}

// NewSupervisor checks cfg and returns a Supervisor; Run starts it.
func NewSupervisor(r Reconnector, cfg SupervisorConfig) (*Supervisor, error) {
	if r == nil || cfg.Redial == nil {
		return nil, fmt.Errorf("%w: supervisor needs a reconnector and a redial function", ErrInvalidConfig)
	}
	if err := validBackendID(cfg.BackendID, true); err != nil {
		return nil, err
	}
	if cfg.DeadConnTimeout <= 0 {
		return nil, fmt.Errorf("%w: a dead-connection timeout of %v leaves no time to reconnect",
			ErrInvalidConfig, cfg.DeadConnTimeout)
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = 10 * time.Second
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 2 * time.Second
	}
	cfg.MaxBackoff = max(cfg.MaxBackoff, cfg.MinBackoff)
	return &Supervisor{r: r, cfg: cfg, size: cfg.SizeBytes, flags: cfg.ServerFlags}, nil
}

// SetExport changes the size and flags a redialled export must match, e.g.
// after the device was resized. Safe to call while Run runs.
func (s *Supervisor) SetExport(sizeBytes uint64, flags uint16) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.size, s.flags = sizeBytes, flags
}

// matches reports whether a redialled export may replace the device's
// connections: the same flags the kernel uses and at least the device's
// sectors. A grown export is accepted (the device keeps its size until the
// volume is expanded, which is how an admin grows a volume: the export
// first, then the claim; a connection lost in between must not strand the
// device); a shrunk one would lose data at the end and is refused.
func (s *Supervisor) matches(size uint64, flags uint16) (bool, uint64, uint16) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return size>>9 >= s.size>>9 && flags&kernelFlags == s.flags&kernelFlags, s.size, s.flags
}

func (s *Supervisor) emit(e Event) {
	if s.cfg.OnEvent == nil {
		return
	}
	e.Index, e.Time = s.cfg.Index, time.Now()
	s.cfg.OnEvent(e)
}

// Run supervises until ctx ends (returning ctx.Err()), the device is gone
// (ErrDeviceGone), or a reconnect fails for good (an error wrapping
// ErrReconnectTimeout, ErrExportChanged, ErrBackendMismatch or
// ErrNotFound).
func (s *Supervisor) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events, err := s.r.WatchLinkDead(ctx)
	if err != nil {
		return fmt.Errorf("supervise nbd%d: %w", s.cfg.Index, err)
	}
	s.emit(Event{Kind: EventWatching})
	tick := time.NewTicker(s.cfg.PollInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case index, ok := <-events:
			if !ok {
				return ctx.Err()
			}
			if index != s.cfg.Index && index != AnyIndex {
				continue
			}
			s.emit(Event{Kind: EventLinkDead})
			if err := s.reconnect(ctx); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				s.emit(Event{Kind: EventGaveUp, Err: err})
				return err
			}
		case <-tick.C:
			gone, err := s.gone(ctx)
			if err != nil {
				s.emit(Event{Kind: EventStatusFailed, Err: err})
				continue
			}
			if gone {
				err := fmt.Errorf("nbd%d: %w", s.cfg.Index, ErrDeviceGone)
				s.emit(Event{Kind: EventDeviceGone, Err: err})
				return err
			}
		}
	}
}

// gone reports whether STATUS no longer shows the device connected.
func (s *Supervisor) gone(ctx context.Context) (bool, error) {
	st, err := s.r.Status(ctx)
	if err != nil {
		return false, err
	}
	for _, x := range st {
		if x.Index == s.cfg.Index {
			return !x.Connected, nil
		}
	}
	return true, nil
}

// reconnect redials and reconfigures until it works, a permanent error
// occurs, or the window ends. Sockets beyond the device's dead slots are
// ignored by the kernel, so a reconnect for a link that is in fact alive
// (after lost notifications) is harmless.
func (s *Supervisor) reconnect(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DeadConnTimeout)
	defer cancel()
	delay := s.cfg.MinBackoff
	var last error
	for attempt := 1; ; attempt++ {
		err := s.attempt(ctx, attempt)
		if err == nil {
			s.emit(Event{Kind: EventReconnected, Attempt: attempt})
			return nil
		}
		if errors.Is(err, ErrBackendMismatch) || errors.Is(err, ErrNotFound) || errors.Is(err, ErrInvalidConfig) {
			return err
		}
		last = err
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("nbd%d: %w after %d attempts in %v: %w",
				s.cfg.Index, ErrReconnectTimeout, attempt, s.cfg.DeadConnTimeout, last)
		case <-t.C:
		}
		delay = min(2*delay, s.cfg.MaxBackoff)
	}
}

func (s *Supervisor) attempt(ctx context.Context, attempt int) error {
	socks, size, flags, err := s.cfg.Redial(ctx)
	defer func() {
		for _, f := range socks {
			if f != nil {
				_ = f.Close()
			}
		}
	}()
	if err != nil {
		err = fmt.Errorf("redial: %w", err)
		s.emit(Event{Kind: EventRedialFailed, Attempt: attempt, Err: err})
		return err
	}
	if len(socks) == 0 {
		err = fmt.Errorf("redial: %w: no sockets", ErrInvalidConfig)
		s.emit(Event{Kind: EventRedialFailed, Attempt: attempt, Err: err})
		return err
	}
	if ok, wantSize, wantFlags := s.matches(size, flags); !ok {
		err = fmt.Errorf("%w: size %d flags %#x, the device has size %d flags %#x",
			ErrExportChanged, size, flags, wantSize, wantFlags)
		s.emit(Event{Kind: EventExportChanged, Attempt: attempt, Err: err})
		return err
	}
	err = s.r.Reconfigure(ctx, s.cfg.Index, Reconfig{BackendID: s.cfg.BackendID, Sockets: socks})
	if err != nil {
		s.emit(Event{Kind: EventReconfigureFailed, Attempt: attempt, Err: err})
		return err
	}
	// RECONFIGURE does not say which sockets the kernel took (none, if
	// no slot was dead): the Supervisor keeps none of them.
	return nil
}
