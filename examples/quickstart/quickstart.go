// Package quickstart holds the quickstart Caddyfile, embedded so the demo
// runs exactly what the example shows.
package quickstart

import _ "embed"

// Caddyfile is examples/quickstart/Caddyfile.
//
//go:embed Caddyfile
var Caddyfile string
