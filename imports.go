// Package caddyaibalance blank-imports every Caddy module of the plugin, so that
// `xcaddy build --with github.com/aibalance/caddy-aibalance` gets them all.
package caddyaibalance

import (
	_ "github.com/aibalance/caddy-aibalance/aibalance"
	_ "github.com/aibalance/caddy-aibalance/caddyfile"
	_ "github.com/aibalance/caddy-aibalance/selection"
)
