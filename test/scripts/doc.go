// SPDX-License-Identifier: Apache-2.0

// Package scripts tests the project's shell scripts (hack/install-deps.sh,
// the e2e vm provider's fail-fast paths, the Makefile's test contract) by
// running them with stub programs first on PATH that model the real ones.
package scripts
