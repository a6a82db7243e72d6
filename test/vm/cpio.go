// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"
)

// Entry kinds of an image tree.
const (
	kindDir = iota + 1
	kindFile
	kindSymlink
	kindCharDev
)

// Mode type bits of the cpio "newc" format (the same as st_mode).
const (
	cpioDir     = 0o040000
	cpioFile    = 0o100000
	cpioSymlink = 0o120000
	cpioCharDev = 0o020000
)

// entry is one node of an image tree.
type entry struct {
	kind     int
	perm     uint32 // permission bits incl. setuid/setgid/sticky
	target   string // symlink target
	hostPath string // regular file: content source on the host ("" → data)
	data     []byte // regular file: inline content
	major    uint32 // device major (kindCharDev)
	minor    uint32 // device minor (kindCharDev)
	// inherited marks nodes that exist in an earlier archive (the base
	// image); they take part in path resolution but are not written.
	inherited bool
}

// tree is the in-memory description of an initramfs archive. Keys are
// slash-separated paths relative to the guest root, without a leading
// slash ("usr/bin/nbdkit"). Symlinks among the directory components of
// a path are followed when nodes are added, so that an image mirroring
// the merged-/usr layout (bin → usr/bin) keeps one node per file.
type tree struct {
	nodes map[string]*entry
}

func newTree() *tree { return &tree{nodes: map[string]*entry{}} }

// rel converts a guest path ("/usr/bin/x", "usr/bin/x") into a tree key.
func rel(p string) (string, error) {
	c := path.Clean("/" + p)
	if c == "/" {
		return "", fmt.Errorf("guest path %q names the root directory", p)
	}
	return c[1:], nil
}

// resolveDir returns the tree key of p after following symlinks that
// the tree holds for p's directory components. The last component is
// not followed.
func (t *tree) resolveDir(p string) (string, error) {
	key, err := rel(p)
	if err != nil {
		return "", err
	}
	for hops := 0; hops < 40; hops++ {
		comps := strings.Split(key, "/")
		restart := false
		for i := 1; i < len(comps); i++ {
			prefix := strings.Join(comps[:i], "/")
			n := t.nodes[prefix]
			if n == nil || n.kind != kindSymlink {
				continue
			}
			target := n.target
			if !strings.HasPrefix(target, "/") {
				target = path.Join(path.Dir("/"+prefix), target)
			}
			key, err = rel(path.Join(append([]string{target}, comps[i:]...)...))
			if err != nil {
				return "", err
			}
			restart = true
			break
		}
		if !restart {
			return key, nil
		}
	}
	return "", fmt.Errorf("too many levels of symbolic links resolving %q", p)
}

// put stores n at the resolved location of p, creating parents. It
// refuses to replace a node by one of a different kind; a file may
// replace a file (later additions win).
func (t *tree) put(p string, n *entry) (string, error) {
	key, err := t.resolveDir(p)
	if err != nil {
		return "", err
	}
	if err := t.mkdirParents(key); err != nil {
		return "", err
	}
	if old := t.nodes[key]; old != nil {
		switch {
		case old.kind == kindDir && n.kind == kindDir:
			return key, nil
		case old.inherited && old.kind != kindDir && n.kind != kindDir:
			// A node of the base image: the kernel's unpacker replaces it.
		case old.kind != n.kind:
			return "", fmt.Errorf("image path /%s: cannot replace an existing node of another type", key)
		case old.kind == kindSymlink && old.target == n.target:
			return key, nil
		}
	}
	t.nodes[key] = n
	return key, nil
}

// mkdirParents creates directory nodes for every parent of key (which
// must already be resolved).
func (t *tree) mkdirParents(key string) error {
	comps := strings.Split(key, "/")
	for i := 1; i < len(comps); i++ {
		prefix := strings.Join(comps[:i], "/")
		switch n := t.nodes[prefix]; {
		case n == nil:
			t.nodes[prefix] = &entry{kind: kindDir, perm: 0o755}
		case n.kind != kindDir:
			return fmt.Errorf("image path /%s: parent /%s is not a directory", key, prefix)
		}
	}
	return nil
}

// mkdir adds a directory with the given permissions (parents get 0755).
func (t *tree) mkdir(p string, perm fs.FileMode) error {
	key, err := t.put(p, &entry{kind: kindDir, perm: uint32(perm.Perm()) | specialBits(perm)})
	if err != nil {
		return err
	}
	// An existing directory takes the explicitly requested mode.
	t.nodes[key].perm = uint32(perm.Perm()) | specialBits(perm)
	return nil
}

// addFile adds a regular file whose content is read from hostPath when
// the archive is written.
func (t *tree) addFile(p, hostPath string, perm fs.FileMode) error {
	_, err := t.put(p, &entry{kind: kindFile, perm: uint32(perm.Perm()) | specialBits(perm), hostPath: hostPath})
	return err
}

// addData adds a regular file with inline content.
func (t *tree) addData(p string, data []byte, perm fs.FileMode) error {
	_, err := t.put(p, &entry{kind: kindFile, perm: uint32(perm.Perm()), data: data})
	return err
}

// addSymlink adds a symbolic link p → target.
func (t *tree) addSymlink(p, target string) error {
	_, err := t.put(p, &entry{kind: kindSymlink, perm: 0o777, target: target})
	return err
}

// addCharDev adds a character device node.
func (t *tree) addCharDev(p string, perm fs.FileMode, major, minor uint32) error {
	_, err := t.put(p, &entry{kind: kindCharDev, perm: uint32(perm.Perm()), major: major, minor: minor})
	return err
}

// exists reports whether the resolved path p holds a node.
func (t *tree) exists(p string) bool {
	key, err := t.resolveDir(p)
	return err == nil && t.nodes[key] != nil
}

func specialBits(m fs.FileMode) uint32 {
	var b uint32
	if m&fs.ModeSetuid != 0 {
		b |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		b |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		b |= 0o1000
	}
	return b
}

// writeCPIO writes the non-inherited nodes of t as one cpio archive in
// the "newc" format that the kernel's initramfs unpacker reads. Nodes
// are written in path order, so directories precede their content. The
// archive is padded to a multiple of 512 bytes so that further archives
// can be concatenated after it.
func (t *tree) writeCPIO(w io.Writer) error {
	keys := make([]string, 0, len(t.nodes))
	for k, n := range t.nodes {
		if !n.inherited {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	cw := &cpioWriter{w: bufio.NewWriterSize(w, 1<<20)}
	for _, k := range keys {
		if err := cw.writeNode(k, t.nodes[k]); err != nil {
			return err
		}
	}
	if err := cw.trailer(); err != nil {
		return err
	}
	return cw.w.Flush()
}

// cpioWriter emits "newc" records.
type cpioWriter struct {
	w   *bufio.Writer
	ino uint32
	off int64
}

func (c *cpioWriter) header(name string, mode, nlink uint32, size int64, major, minor uint32) error {
	if size > 0xffffffff {
		return fmt.Errorf("%s: %d bytes is too large for a newc cpio archive", name, size)
	}
	c.ino++
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, uint32(size), 0, 0, major, minor, len(name)+1, 0)
	if _, err := c.w.WriteString(hdr); err != nil {
		return err
	}
	if _, err := c.w.WriteString(name + "\x00"); err != nil {
		return err
	}
	c.off += int64(len(hdr) + len(name) + 1)
	return c.pad(4)
}

func (c *cpioWriter) pad(align int64) error {
	if r := c.off % align; r != 0 {
		n := align - r
		if _, err := c.w.Write(make([]byte, n)); err != nil {
			return err
		}
		c.off += n
	}
	return nil
}

func (c *cpioWriter) writeNode(name string, n *entry) error {
	switch n.kind {
	case kindDir:
		return c.header(name, cpioDir|n.perm, 2, 0, 0, 0)
	case kindSymlink:
		if err := c.header(name, cpioSymlink|0o777, 1, int64(len(n.target)), 0, 0); err != nil {
			return err
		}
		return c.body(strings.NewReader(n.target), int64(len(n.target)), name)
	case kindCharDev:
		return c.header(name, cpioCharDev|n.perm, 1, 0, n.major, n.minor)
	case kindFile:
		if n.hostPath == "" {
			if err := c.header(name, cpioFile|n.perm, 1, int64(len(n.data)), 0, 0); err != nil {
				return err
			}
			return c.body(strings.NewReader(string(n.data)), int64(len(n.data)), name)
		}
		f, err := os.Open(n.hostPath)
		if err != nil {
			return fmt.Errorf("image file /%s: %w", name, err)
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return fmt.Errorf("image file /%s: %w", name, err)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("image file /%s: %s is not a regular file", name, n.hostPath)
		}
		if err := c.header(name, cpioFile|n.perm, 1, st.Size(), 0, 0); err != nil {
			return err
		}
		return c.body(f, st.Size(), name)
	}
	return fmt.Errorf("image path /%s: unknown node kind %d", name, n.kind)
}

func (c *cpioWriter) body(r io.Reader, size int64, name string) error {
	n, err := io.CopyN(c.w, r, size)
	c.off += n
	if err != nil {
		return fmt.Errorf("image file /%s: copied %d of %d bytes: %w", name, n, size, err)
	}
	return c.pad(4)
}

func (c *cpioWriter) trailer() error {
	if err := c.header("TRAILER!!!", 0, 1, 0, 0, 0); err != nil {
		return err
	}
	return c.pad(512)
}
