// SPDX-License-Identifier: Apache-2.0

package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"
)

// helpError carries a command's help text: run prints it on stdout and
// exits 0.
type helpError struct{ text string }

func (e *helpError) Error() string { return "help requested" }

// Is makes a helpError match flag.ErrHelp.
func (e *helpError) Is(target error) bool { return target == flag.ErrHelp }

// parseFlags parses args with fs, flags and arguments in any order (GNU
// style: `probe URI --json` works; "--" ends the flags). Afterwards
// fs.NArg/fs.Arg/fs.Args give the arguments that are not flags, in order.
// Errors are returned, never printed (run prints them once): a bad flag is
// an errUsage, --help or -h a *helpError with usage, a text of its own
// lines: "COMMAND [flags] ARGS", optionally followed by a blank line and
// more description, to which the flags are appended.
func parseFlags(fs *flag.FlagSet, args []string, usage string) error {
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return &helpError{text: helpText(fs, usage)}
			}
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		// Parse stopped at "--" (consumed) or at an argument.
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			positional = append(positional, rest...)
			break
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
	// Leave the arguments where fs.Args finds them; flag values stay set.
	return fs.Parse(append([]string{"--"}, positional...))
}

// helpText is the help of a command: its usage lines and every flag, each
// as "--name TYPE" and its description with the default.
func helpText(fs *flag.FlagSet, usage string) string {
	var b strings.Builder
	first, more, _ := strings.Cut(usage, "\n")
	fmt.Fprintf(&b, "Usage: nbd-csi %s\n", first)
	if more != "" {
		b.WriteString(more)
		b.WriteString("\n")
	}
	b.WriteString("\nFlags:\n")
	fs.VisitAll(func(fl *flag.Flag) {
		fmt.Fprintf(&b, "  --%s", fl.Name)
		if t := flagType(fl); t != "" {
			fmt.Fprintf(&b, " %s", t)
		}
		fmt.Fprintf(&b, "\n      %s", fl.Usage)
		if d := flagDefault(fl); d != "" && !strings.Contains(fl.Usage, "(default") {
			fmt.Fprintf(&b, " (default %s)", d)
		}
		b.WriteString("\n")
	})
	return b.String()
}

// flagType names the value a flag takes; "" for a boolean flag.
func flagType(fl *flag.Flag) string {
	if bf, ok := fl.Value.(interface{ IsBoolFlag() bool }); ok && bf.IsBoolFlag() {
		return ""
	}
	switch fl.Name {
	case "v":
		return "LEVEL"
	case "vmodule":
		return "PATTERN=LEVEL,..."
	}
	if g, ok := fl.Value.(flag.Getter); ok {
		switch g.Get().(type) {
		case time.Duration:
			return "DURATION"
		case int, int64, uint, uint64:
			return "N"
		case float64:
			return "NUMBER"
		}
	}
	return "STRING"
}

// flagDefault is a flag's default as a user would type it, "" when it is
// the zero value (nothing worth saying).
func flagDefault(fl *flag.Flag) string {
	switch d := fl.DefValue; d {
	case "", "0", "false", "0s":
		return ""
	default:
		if flagType(fl) == "STRING" {
			return fmt.Sprintf("%q", d)
		}
		return d
	}
}
