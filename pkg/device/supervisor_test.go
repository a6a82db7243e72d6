// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// fakeReconnector is a stateful fake of the kernel side for Supervisor. Its
// RECONFIGURE models the kernel's: each socket fills a dead slot, sockets
// beyond the dead slots are ignored, and success is reported either way.
type fakeReconnector struct {
	events chan uint32

	mu        sync.Mutex
	reconfigs []Reconfig
	reconfErr []error // consumed one per call
	connected bool
	dead      int // dead connection slots of nbd3
	taken     int // sockets the kernel took
}

// die kills nbd3's connection: a dead slot and a LINK_DEAD.
func (f *fakeReconnector) die() {
	f.mu.Lock()
	f.dead++
	f.mu.Unlock()
	f.events <- 3
}

func newFakeReconnector() *fakeReconnector {
	return &fakeReconnector{events: make(chan uint32, 8), connected: true}
}

func (f *fakeReconnector) WatchLinkDead(ctx context.Context) (<-chan uint32, error) {
	out := make(chan uint32)
	go func() {
		defer close(out)
		for {
			select {
			case <-ctx.Done():
				return
			case i := <-f.events:
				select {
				case out <- i:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out, nil
}

func (f *fakeReconnector) Reconfigure(_ context.Context, _ uint32, rc Reconfig) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range rc.Sockets {
		if _, err := s.Stat(); err != nil {
			return errors.New("socket closed before reconfigure")
		}
	}
	f.reconfigs = append(f.reconfigs, rc)
	if len(f.reconfErr) > 0 {
		err := f.reconfErr[0]
		f.reconfErr = f.reconfErr[1:]
		return err
	}
	n := min(f.dead, len(rc.Sockets))
	f.dead -= n
	f.taken += n
	return nil
}

func (f *fakeReconnector) Status(context.Context) ([]Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return []Status{{Index: 1, Connected: true}, {Index: 3, Connected: f.connected}}, nil
}

// redialer returns scripted results and remembers the files it handed out.
type redialer struct {
	mu      sync.Mutex
	results []redialResult
	files   []*os.File
}

type redialResult struct {
	size  uint64
	flags uint16
	err   error
}

func (r *redialer) redial(context.Context) ([]*os.File, uint64, uint16, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	res := redialResult{size: 1 << 20, flags: flagHasFlags | flagSendFlush}
	if len(r.results) > 0 {
		res, r.results = r.results[0], r.results[1:]
	}
	if res.err != nil {
		return nil, 0, 0, res.err
	}
	a, b, err := os.Pipe()
	if err != nil {
		return nil, 0, 0, err
	}
	b.Close()
	r.files = append(r.files, a)
	return []*os.File{a}, res.size, res.flags, nil
}

type eventLog struct {
	mu  sync.Mutex
	evs []Event
	ch  chan Event
}

func newEventLog() *eventLog { return &eventLog{ch: make(chan Event, 100)} }

func (l *eventLog) add(e Event) {
	l.mu.Lock()
	l.evs = append(l.evs, e)
	l.mu.Unlock()
	l.ch <- e
}

func (l *eventLog) kinds() []EventKind {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []EventKind
	for _, e := range l.evs {
		out = append(out, e.Kind)
	}
	return out
}

func (l *eventLog) waitFor(t *testing.T, k EventKind) Event {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case e := <-l.ch:
			if e.Kind == k {
				return e
			}
		case <-timeout:
			t.Fatalf("no %v event; got %v", k, l.kinds())
		}
	}
}

func supervisorConfig(r *redialer, l *eventLog) SupervisorConfig {
	return SupervisorConfig{
		Index: 3, BackendID: "vol", SizeBytes: 1 << 20, ServerFlags: flagHasFlags | flagSendFlush,
		DeadConnTimeout: 300 * time.Millisecond, Redial: r.redial, PollInterval: time.Hour,
		MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, OnEvent: l.add,
	}
}

func TestSupervisorReconnects(t *testing.T) {
	f := newFakeReconnector()
	r := &redialer{results: []redialResult{
		{err: errors.New("connection refused")},
		{size: 1 << 20, flags: flagHasFlags | flagSendFlush | 1<<10}, // SEND_CACHE: ignored
		{size: 1<<20 + 100, flags: flagHasFlags | flagSendFlush},     // same sectors
		{size: 2 << 20, flags: flagHasFlags | flagSendFlush},         // grown: the device keeps its size
	}}
	l := newEventLog()
	s, err := NewSupervisor(f, supervisorConfig(r, l))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()

	f.events <- 1 // another device
	f.die()
	e := l.waitFor(t, EventReconnected)
	if e.Attempt != 2 || e.Index != 3 {
		t.Errorf("reconnected event %+v, want attempt 2 on nbd3", e)
	}
	f.events <- AnyIndex // lost notifications: check anyway
	l.waitFor(t, EventReconnected)
	f.die() // the server now offers a grown export
	l.waitFor(t, EventReconnected)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run: %v", err)
	}
	want := []EventKind{EventWatching, EventLinkDead, EventRedialFailed, EventReconnected, EventLinkDead, EventReconnected,
		EventLinkDead, EventReconnected}
	if diff := cmp.Diff(want, l.kinds()); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.reconfigs) != 3 {
		t.Fatalf("reconfigures %+v, want 3", f.reconfigs)
	}
	for _, rc := range f.reconfigs { // sockets only: the device keeps its size
		if rc.BackendID != "vol" || len(rc.Sockets) != 1 || rc.SizeBytes != 0 {
			t.Errorf("reconfigure %+v", rc)
		}
	}
	// The kernel took the two replacements for dead connections and
	// ignored the socket offered after lost notifications; the Supervisor
	// closed all of its own copies (below), keeping none of what it
	// cannot know the kernel took.
	if f.dead != 0 || f.taken != 2 {
		t.Errorf("kernel: %d dead slots, took %d sockets; want 0 and 2", f.dead, f.taken)
	}
	for _, file := range r.files {
		if _, err := file.Stat(); !errors.Is(err, os.ErrClosed) {
			t.Error("redialled socket left open")
		}
	}
}

func TestSupervisorRefusesChangedExport(t *testing.T) {
	for name, res := range map[string]redialResult{
		"shrunk":    {size: 1<<20 - 512, flags: flagHasFlags | flagSendFlush},
		"read-only": {size: 1 << 20, flags: flagHasFlags | flagSendFlush | flagReadOnly},
	} {
		t.Run(name, func(t *testing.T) {
			f := newFakeReconnector()
			r := &redialer{}
			for range 1000 {
				r.results = append(r.results, res)
			}
			l := newEventLog()
			s, err := NewSupervisor(f, supervisorConfig(r, l))
			if err != nil {
				t.Fatal(err)
			}
			f.events <- 3
			err = s.Run(context.Background())
			if !errors.Is(err, ErrReconnectTimeout) || !errors.Is(err, ErrExportChanged) {
				t.Fatalf("got %v, want ErrReconnectTimeout wrapping ErrExportChanged", err)
			}
			if len(f.reconfigs) != 0 || f.taken != 0 {
				t.Errorf("a changed export was handed to the kernel (%d reconfigures, %d taken)", len(f.reconfigs), f.taken)
			}
			kinds := l.kinds()
			if kinds[0] != EventWatching || kinds[2] != EventExportChanged || kinds[len(kinds)-1] != EventGaveUp {
				t.Errorf("events %v", kinds)
			}
		})
	}
}

func TestSupervisorPermanentError(t *testing.T) {
	f := newFakeReconnector()
	f.reconfErr = []error{ErrBackendMismatch}
	l := newEventLog()
	cfg := supervisorConfig(&redialer{}, l)
	cfg.DeadConnTimeout = time.Hour
	s, err := NewSupervisor(f, cfg)
	if err != nil {
		t.Fatal(err)
	}
	f.events <- 3
	if err := s.Run(context.Background()); !errors.Is(err, ErrBackendMismatch) {
		t.Fatalf("got %v, want ErrBackendMismatch at once", err)
	}
}

func TestSupervisorDeviceGone(t *testing.T) {
	f := newFakeReconnector()
	f.connected = false
	l := newEventLog()
	cfg := supervisorConfig(&redialer{}, l)
	cfg.PollInterval = 5 * time.Millisecond
	s, err := NewSupervisor(f, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Run(context.Background()); !errors.Is(err, ErrDeviceGone) {
		t.Fatalf("got %v, want ErrDeviceGone", err)
	}
	if diff := cmp.Diff([]EventKind{EventWatching, EventDeviceGone}, l.kinds()); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
}

func TestNewSupervisorValidation(t *testing.T) {
	r := &redialer{}
	ok := SupervisorConfig{BackendID: "v", DeadConnTimeout: time.Second, Redial: r.redial}
	for name, mutate := range map[string]func(*SupervisorConfig){
		"no dead-conn timeout": func(c *SupervisorConfig) { c.DeadConnTimeout = 0 },
		"no redial":            func(c *SupervisorConfig) { c.Redial = nil },
		"no backend":           func(c *SupervisorConfig) { c.BackendID = "" },
	} {
		t.Run(name, func(t *testing.T) {
			c := ok
			mutate(&c)
			if _, err := NewSupervisor(newFakeReconnector(), c); !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("got %v, want ErrInvalidConfig", err)
			}
		})
	}
	if _, err := NewSupervisor(newFakeReconnector(), ok); err != nil {
		t.Fatal(err)
	}
}

func TestSupervisorSetExport(t *testing.T) {
	f := newFakeReconnector()
	r := &redialer{results: []redialResult{{size: 2 << 20, flags: flagHasFlags | flagSendFlush}}}
	l := newEventLog()
	s, err := NewSupervisor(f, supervisorConfig(r, l))
	if err != nil {
		t.Fatal(err)
	}
	s.SetExport(2<<20, flagHasFlags|flagSendFlush) // the device was resized
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	f.events <- 3
	if e := l.waitFor(t, EventReconnected); e.Attempt != 1 {
		t.Errorf("reconnected at attempt %d, want 1", e.Attempt)
	}
	cancel()
	<-done
}
