// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// addHost mirrors the host path p into the image at the same location,
// reproducing every symlink met on the way (including symlinked
// directories such as /lib → usr/lib). Directories are copied
// recursively.
func (t *tree) addHost(p string) error {
	if !filepath.IsAbs(p) {
		return fmt.Errorf("host path %q is not absolute", p)
	}
	cur := filepath.Clean(p)
	for hops := 0; hops < 40; hops++ {
		comps := strings.Split(strings.TrimPrefix(cur, "/"), "/")
		next := ""
		for i := 1; i <= len(comps); i++ {
			prefix := "/" + filepath.Join(comps[:i]...)
			fi, err := os.Lstat(prefix)
			if err != nil {
				return err
			}
			switch {
			case fi.Mode()&fs.ModeSymlink != 0:
				target, err := os.Readlink(prefix)
				if err != nil {
					return err
				}
				if err := t.addSymlink(prefix, target); err != nil {
					return err
				}
				if !filepath.IsAbs(target) {
					target = filepath.Join(filepath.Dir(prefix), target)
				}
				next = filepath.Join(append([]string{target}, comps[i:]...)...)
			case i < len(comps):
				if !fi.IsDir() {
					return fmt.Errorf("%s: %s is not a directory", p, prefix)
				}
				if !t.exists(prefix) {
					if err := t.mkdir(prefix, fi.Mode()); err != nil {
						return err
					}
				}
			case fi.IsDir():
				return t.addHostDir(prefix)
			case fi.Mode().IsRegular():
				return t.addFile(prefix, prefix, fi.Mode())
			default:
				return fmt.Errorf("%s: unsupported file type %s", prefix, fi.Mode().Type())
			}
			if next != "" {
				break
			}
		}
		cur = next
	}
	return fmt.Errorf("%s: too many levels of symbolic links", p)
}

// addHostDir copies the directory tree at dir (a path without symlinked
// components) into the image at the same location.
func (t *tree) addHostDir(dir string) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			return t.mkdir(p, fi.Mode())
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return t.addSymlink(p, target)
		case fi.Mode().IsRegular():
			return t.addFile(p, p, fi.Mode())
		}
		return nil // sockets, fifos and devices are skipped
	})
}

// addGuestCopy adds the host file or directory src at the guest path
// dst. Symlinks inside a copied directory are kept as symlinks; src
// itself is followed. A non-zero mode overrides the permission bits of
// a regular file.
func (t *tree) addGuestCopy(src, dst string, mode fs.FileMode) error {
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	if fi.Mode().IsRegular() {
		if mode == 0 {
			mode = fi.Mode()
		}
		return t.addFile(dst, src, mode)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s: not a regular file or directory", src)
	}
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		r, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		g := filepath.Join(dst, r)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			return t.mkdir(g, info.Mode())
		case info.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return t.addSymlink(g, target)
		case info.Mode().IsRegular():
			return t.addFile(g, p, info.Mode())
		}
		return nil
	})
}

// sharedLibs returns the shared libraries (including the dynamic loader)
// that the ELF files need, as reported by ldd(1). Static executables and
// non-ELF files contribute nothing. A library that ldd cannot find is an
// error naming the file that needs it.
func sharedLibs(ctx context.Context, files []string) ([]string, error) {
	var dynamic []string
	for _, f := range files {
		ok, err := isDynamicELF(f)
		if err != nil {
			return nil, err
		}
		if ok {
			dynamic = append(dynamic, f)
		}
	}
	if len(dynamic) == 0 {
		return nil, nil
	}
	seen := map[string]bool{}
	var libs []string
	// One ldd invocation per chunk keeps the cost at a few process starts.
	for start := 0; start < len(dynamic); start += 64 {
		chunk := dynamic[start:min(start+64, len(dynamic))]
		cmd := exec.CommandContext(ctx, "ldd", chunk...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("ldd %s: %v: %s", strings.Join(chunk, " "), err, strings.TrimSpace(stderr.String()))
		}
		found, err := parseLDD(out, chunk)
		if err != nil {
			return nil, err
		}
		for _, l := range found {
			if !seen[l] {
				seen[l] = true
				libs = append(libs, l)
			}
		}
	}
	sort.Strings(libs)
	return libs, nil
}

// parseLDD extracts absolute library paths from ldd output. With more
// than one file ldd prefixes each block with "file:".
func parseLDD(out []byte, files []string) ([]string, error) {
	current := ""
	if len(files) == 1 {
		current = files[0]
	}
	isHeader := map[string]bool{}
	for _, f := range files {
		isHeader[f+":"] = true
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if isHeader[strings.TrimSpace(line)] && !strings.HasPrefix(line, "\t") {
			current = strings.TrimSuffix(strings.TrimSpace(line), ":")
			continue
		}
		line = strings.TrimSpace(line)
		if strings.Contains(line, "=> not found") {
			return nil, fmt.Errorf("%s needs %s, which ldd cannot find", current, strings.Fields(line)[0])
		}
		var cand string
		if _, after, ok := strings.Cut(line, "=>"); ok {
			if f := strings.Fields(after); len(f) > 0 {
				cand = f[0]
			}
		} else if f := strings.Fields(line); len(f) > 0 {
			cand = f[0]
		}
		if strings.HasPrefix(cand, "/") {
			libs = append(libs, cand)
		}
	}
	return libs, sc.Err()
}

// isDynamicELF reports whether f is an ELF file with dynamic
// dependencies (a program interpreter or DT_NEEDED entries).
func isDynamicELF(f string) (bool, error) {
	e, err := elf.Open(f)
	if err != nil {
		var fe *elf.FormatError
		if errors.As(err, &fe) {
			return false, nil // scripts, data files
		}
		return false, err
	}
	defer e.Close()
	for _, p := range e.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			return true, nil
		}
	}
	return false, nil
}

// isStaticELF reports whether f is an ELF executable without a program
// interpreter, i.e. one that runs without any shared library.
func isStaticELF(f string) (bool, error) {
	e, err := elf.Open(f)
	if err != nil {
		return false, err
	}
	defer e.Close()
	for _, p := range e.Progs {
		if p.Type == elf.PT_INTERP {
			return false, nil
		}
	}
	return true, nil
}
