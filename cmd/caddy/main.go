// Command caddy is Caddy with its standard modules and the aibalance plugin,
// built without xcaddy: go build ./cmd/caddy
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/aibalance/caddy-aibalance"
)

func main() {
	caddycmd.Main()
}
