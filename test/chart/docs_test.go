// SPDX-License-Identifier: Apache-2.0

package chart

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// schemaKeys returns the leaf value paths values.schema.json allows, items
// of arrays as "key[]" (e.g. storageClasses[].tlsSecret.name).
func schemaKeys(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("../../charts/nbd-csi/values.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	var root map[string]any
	if err := json.Unmarshal(b, &root); err != nil {
		t.Fatal(err)
	}
	defs, _ := root["definitions"].(map[string]any)
	var keys []string
	var walk func(node map[string]any, path string)
	walk = func(node map[string]any, path string) {
		if ref, ok := node["$ref"].(string); ok {
			node = defs[ref[strings.LastIndex(ref, "/")+1:]].(map[string]any)
		}
		if props, ok := node["properties"].(map[string]any); ok {
			for k, v := range props {
				walk(v.(map[string]any), strings.TrimPrefix(path+"."+k, "."))
			}
			return
		}
		if items, ok := node["items"].(map[string]any); ok && items["properties"] != nil {
			walk(items, path+"[]")
			return
		}
		keys = append(keys, path)
	}
	walk(root, "")
	slices.Sort(keys)
	return keys
}

var backticked = regexp.MustCompile("`([^`]+)`")

// documentedKeys reads the values table of docs/install.md: the keys of
// each row's first cell ("`a.b`", "`.c`" for a sibling of the previous
// key, "`a.{b,c}`"), and for the storageClasses[] row the item keys its
// description lists.
func documentedKeys(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("../../docs/install.md")
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, line := range strings.Split(string(b), "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 4 || !strings.HasPrefix(strings.TrimSpace(cells[1]), "`") {
			continue
		}
		parent := ""
		for _, m := range backticked.FindAllStringSubmatch(cells[1], -1) {
			k := m[1]
			if strings.HasPrefix(k, ".") {
				k = parent + k
			}
			parent = k[:max(strings.LastIndex(k, "."), 0)]
			keys = append(keys, expandBraces(k)...)
		}
		if strings.TrimSpace(cells[1]) == "`storageClasses[]`" {
			for _, m := range backticked.FindAllStringSubmatch(cells[3], -1) {
				for _, k := range expandBraces(m[1]) {
					keys = append(keys, "storageClasses[]."+k)
				}
			}
		}
	}
	return keys
}

// expandBraces turns "a.{b,c}" into a.b and a.c.
func expandBraces(k string) []string {
	i, j := strings.Index(k, "{"), strings.Index(k, "}")
	if i < 0 || j < i {
		return []string{k}
	}
	var out []string
	for _, alt := range strings.Split(k[i+1:j], ",") {
		out = append(out, k[:i]+alt+k[j+1:])
	}
	return out
}

// TestValuesDocumented: docs/install.md's values table and the schema
// agree: every value the schema allows is documented (itself or an
// enclosing key), and every documented key exists.
func TestValuesDocumented(t *testing.T) {
	schema := schemaKeys(t)
	docs := documentedKeys(t)
	covered := func(k string) bool {
		for _, d := range docs {
			if k == d || strings.HasPrefix(k, d+".") {
				return true
			}
		}
		return false
	}
	for _, k := range schema {
		if !covered(k) {
			t.Errorf("value %s is in values.schema.json but not in docs/install.md's table", k)
		}
	}
	for _, d := range docs {
		if !slices.ContainsFunc(schema, func(k string) bool { return k == d || strings.HasPrefix(k, d+".") }) {
			t.Errorf("docs/install.md documents %s, which values.schema.json does not allow", d)
		}
	}
}
