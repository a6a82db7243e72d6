// SPDX-License-Identifier: Apache-2.0

package store

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	bolt "go.etcd.io/bbolt"

	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// ServerIdentity returns the identity under which a recorded server is
// kept: records of older versions hold the URI text of whatever spelling
// named the server; they map to its nbd.URI.ServerKey. Identities pass
// unchanged.
func ServerIdentity(server string) string {
	if strings.HasPrefix(server, "tcp:") || strings.HasPrefix(server, "unix:") || strings.HasPrefix(server, "id:") {
		return server
	}
	u, err := nbd.ParseURI(server)
	if err != nil {
		return server
	}
	return u.ServerKey()
}

// migrate brings a store of an older version to schemaVersion: records
// keyed by a server's URI text move to its identity (when two spellings
// of one server recorded one export, the claimed record wins; two claimed
// records both stay, the second under its old spelling, so no volume loses
// its record), then the free index, the counters and the export holder
// index are rebuilt.
func migrate(tx *bolt.Tx) error {
	exports, volumes := tx.Bucket(bucketExports), tx.Bucket(bucketVolumes)
	var all []Export
	if err := exports.ForEach(func(k, v []byte) error {
		var e Export
		if err := json.Unmarshal(v, &e); err != nil {
			return fmt.Errorf("corrupt record %q: %w", k, err)
		}
		all = append(all, e)
		return nil
	}); err != nil {
		return err
	}
	// Claimed records first, so they win a collision.
	sort.SliceStable(all, func(i, j int) bool { return all[i].VolumeID != "" && all[j].VolumeID == "" })
	for _, e := range all {
		id := ServerIdentity(e.Server)
		if id == e.Server {
			continue
		}
		oldKey := e.Key()
		moved := e
		moved.Server = id
		var there Export
		found, err := getJSON(exports, moved.Key(), &there)
		if err != nil {
			return err
		}
		if found && there.VolumeID != "" {
			if e.VolumeID == "" {
				if err := exports.Delete([]byte(oldKey)); err != nil {
					return err
				}
			}
			continue // both claimed: keep both
		}
		if err := exports.Delete([]byte(oldKey)); err != nil {
			return err
		}
		if err := putJSON(exports, moved.Key(), &moved); err != nil {
			return err
		}
		if e.VolumeID != "" {
			if err := volumes.Put([]byte(e.VolumeID), []byte(moved.Key())); err != nil {
				return err
			}
		}
	}
	// Rebuild the free index and the counters from the records.
	for _, name := range [][]byte{bucketFree, bucketMeta, bucketExportHolders} {
		if err := tx.DeleteBucket(name); err != nil {
			return err
		}
		if _, err := tx.CreateBucket(name); err != nil {
			return err
		}
	}
	if err := exports.ForEach(func(k, v []byte) error {
		var e Export
		if err := json.Unmarshal(v, &e); err != nil {
			return fmt.Errorf("corrupt record %q: %w", k, err)
		}
		if e.Phase == PhaseAvailable {
			if err := tx.Bucket(bucketFree).Put(freeKey(&e), k); err != nil {
				return err
			}
		}
		return addCount(tx, e.Phase, 1)
	}); err != nil {
		return err
	}
	// Holders of claimed volumes get their export's identity; holders of
	// static volumes recorded before cannot be placed (the store never
	// knew their URI) and are fenced by export from their next publish.
	holders := tx.Bucket(bucketHolders)
	type fix struct {
		id string
		hs []Attachment
	}
	var fixes []fix
	if err := holders.ForEach(func(k, v []byte) error {
		var hs []Attachment
		if err := json.Unmarshal(v, &hs); err != nil {
			return fmt.Errorf("corrupt record %q: %w", k, err)
		}
		key := volumes.Get(k)
		if key == nil || len(hs) == 0 {
			return nil
		}
		for i := range hs {
			hs[i].Export = string(key)
		}
		fixes = append(fixes, fix{string(k), hs})
		return nil
	}); err != nil {
		return err
	}
	for _, f := range fixes {
		if err := putJSON(holders, f.id, f.hs); err != nil {
			return err
		}
		if err := tx.Bucket(bucketExportHolders).Put(exportHolderKey(f.hs[0].Export, f.id), nil); err != nil {
			return err
		}
	}
	return nil
}
