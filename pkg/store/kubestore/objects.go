// SPDX-License-Identifier: Apache-2.0

package kubestore

import (
	"context"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"

	api "github.com/nbd-csi/nbd-csi/pkg/apis/nbdcsi/v1alpha1"
)

func ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), callTimeout)
}

func fromUnstructured[T any](u *unstructured.Unstructured) (*T, error) {
	out := new(T)
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.UnstructuredContent(), out); err != nil {
		return nil, fmt.Errorf("decode %s %s: %w", u.GetKind(), u.GetName(), err)
	}
	return out, nil
}

func toUnstructured(obj any, kind string) (*unstructured.Unstructured, error) {
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		return nil, err
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion(api.Group + "/" + api.Version)
	u.SetKind(kind)
	return u, nil
}

func kindOf(obj any) string {
	if _, ok := obj.(*api.NBDExport); ok {
		return "NBDExport"
	}
	return "NBDVolume"
}

func get[T any](c context.Context, ri dynamic.ResourceInterface, name string) (*T, error) {
	u, err := ri.Get(c, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	return fromUnstructured[T](u)
}

func create[T any](c context.Context, ri dynamic.ResourceInterface, obj *T) (*T, error) {
	return write(obj, func(u *unstructured.Unstructured) (*unstructured.Unstructured, error) {
		return ri.Create(c, u, metav1.CreateOptions{})
	})
}

// update writes obj if nobody changed it since it was read (its
// resourceVersion); a conflict otherwise.
func update[T any](c context.Context, ri dynamic.ResourceInterface, obj *T) (*T, error) {
	return write(obj, func(u *unstructured.Unstructured) (*unstructured.Unstructured, error) {
		return ri.Update(c, u, metav1.UpdateOptions{})
	})
}

// write sends obj through op and decodes what the API server stored.
func write[T any](obj *T, op func(*unstructured.Unstructured) (*unstructured.Unstructured, error)) (*T, error) {
	u, err := toUnstructured(obj, kindOf(obj))
	if err != nil {
		return nil, err
	}
	if u, err = op(u); err != nil {
		return nil, err
	}
	return fromUnstructured[T](u)
}

// modify applies fn to the object (read afresh after a conflict) and writes
// it when fn reports a change. It returns the object as stored.
func modify[T any](c context.Context, ri dynamic.ResourceInterface, name string, obj *T, fn func(*T) (bool, error)) (*T, error) {
	for range maxAttempts {
		if obj == nil {
			var err error
			if obj, err = get[T](c, ri, name); err != nil {
				return nil, err
			}
		}
		changed, err := fn(obj)
		if err != nil || !changed {
			return obj, err
		}
		out, err := update[T](c, ri, obj)
		if apierrors.IsConflict(err) {
			obj = nil
			continue
		}
		return out, err
	}
	return nil, fmt.Errorf("%s: still conflicting after %d attempts", name, maxAttempts)
}

// The NBDExport operations also feed what they see to the cache.

func (s *Store) seen(o *api.NBDExport, err error) (*api.NBDExport, error) {
	if err == nil && o != nil {
		cp := *o
		s.cache.remember(&cp)
	}
	return o, err
}

func (s *Store) getExport(c context.Context, name string) (*api.NBDExport, error) {
	return s.seen(get[api.NBDExport](c, s.exports, name))
}

func (s *Store) createExport(c context.Context, o *api.NBDExport) (*api.NBDExport, error) {
	return s.seen(create[api.NBDExport](c, s.exports, o))
}

func (s *Store) updateExport(c context.Context, o *api.NBDExport) (*api.NBDExport, error) {
	return s.seen(update[api.NBDExport](c, s.exports, o))
}

func (s *Store) modifyExport(c context.Context, name string, o *api.NBDExport, fn func(*api.NBDExport) (bool, error)) (*api.NBDExport, error) {
	return s.seen(modify[api.NBDExport](c, s.exports, name, o, fn))
}
