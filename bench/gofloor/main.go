// SPDX-License-Identifier: Apache-2.0

// Command gofloor is the smallest Go program that writes a line: the floor
// under any Go process's start-up, against which bench/kernel.sh's
// breakdown (TestKernelBenchBreakdown) compares `nbd-csi version`.
package main

import "os"

func main() { _, _ = os.Stdout.WriteString("gofloor\n") }
