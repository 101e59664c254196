package aicaddyfile

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/dustin/go-humanize"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/selection"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("aibalance", parseGlobal)
}

// parseGlobal sets up the aibalance app from the global option. Syntax:
//
//	{
//	    aibalance {
//	        peek_bytes            <size>
//	        default_output_tokens <n>
//	        chars_per_token       <n>
//	        prefix_block_chars    <n>
//	        model_memory          <n>
//	        prefix_index_blocks   <n>
//	        zone                  <name>   # this instance's zone (see tiers and zones)
//	        scaling {
//	            webhook            <url>
//	            target_utilisation <0..1>|<percent>%
//	            hysteresis         <0..0.5>|<percent>%
//	            min_interval       <duration>
//	            smoothing          <duration>
//	            every              <duration>
//	            min_replicas       <n>
//	            max_replicas       <n>
//	        }
//	    }
//	}
func parseGlobal(d *caddyfile.Dispenser, existing any) (any, error) {
	if existing != nil {
		return nil, d.Err("aibalance global option already specified")
	}
	app := new(aibalance.App)
	d.Next() // consume option name
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		key := d.Val()
		if seen[key] {
			return nil, d.Errf("%s already specified", key)
		}
		seen[key] = true
		if key == "scaling" {
			sc, err := parseScaling(d)
			if err != nil {
				return nil, err
			}
			app.Scaling = sc
			continue
		}
		switch key {
		case "peek_bytes", "default_output_tokens", "chars_per_token", "prefix_block_chars", "model_memory", "prefix_index_blocks", "zone":
		default:
			return nil, d.Errf("unrecognized aibalance global option %q", key)
		}
		if !d.NextArg() {
			return nil, d.ArgErr()
		}
		val := d.Val()
		if d.NextArg() {
			return nil, d.ArgErr()
		}
		switch key {
		case "zone":
			if len(val) > 64 {
				return nil, d.Errf("zone: at most 64 characters, got %d", len(val))
			}
			app.Zone = val
		case "peek_bytes":
			n, err := humanize.ParseBytes(val)
			if err != nil || n == 0 || n > aibalance.MaxPeekBytes {
				return nil, d.Errf("peek_bytes: want a size from 1B to %s such as 64KiB, got %q", humanize.IBytes(aibalance.MaxPeekBytes), val)
			}
			app.PeekBytes = int64(n)
		case "default_output_tokens", "chars_per_token", "prefix_block_chars", "model_memory", "prefix_index_blocks":
			n, err := strconv.Atoi(val)
			if err != nil || n < 1 {
				return nil, d.Errf("%s: want a whole number of at least 1, got %q", key, val)
			}
			switch key {
			case "default_output_tokens":
				app.DefaultOutputTokens = n
			case "chars_per_token":
				app.CharsPerToken = n
			case "prefix_block_chars":
				app.PrefixBlockChars = n
			case "model_memory":
				if n < 2 {
					return nil, d.Errf("model_memory: want at least 2, got %d", n)
				}
				app.ModelMemory = n
			case "prefix_index_blocks":
				if n > 1<<24 {
					return nil, d.Errf("prefix_index_blocks: want at most %d, got %d", 1<<24, n)
				}
				app.PrefixIndexBlocks = n
			}
		default:
			return nil, d.Errf("unrecognized aibalance global option %q", key)
		}
	}
	return httpcaddyfile.App{Name: "aibalance", Value: caddyconfig.JSON(app, nil)}, nil
}

// parseScaling reads the scaling block of the aibalance global option.
func parseScaling(d *caddyfile.Dispenser) (*aibalance.ScalingConfig, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	sc := new(aibalance.ScalingConfig)
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		key := d.Val()
		if seen[key] {
			return nil, d.Errf("scaling: %s already specified", key)
		}
		seen[key] = true
		if !d.NextArg() {
			return nil, d.ArgErr()
		}
		val := d.Val()
		if d.NextArg() {
			return nil, d.ArgErr()
		}
		switch key {
		case "webhook":
			sc.Webhook = val
		case "target_utilisation", "hysteresis":
			v, err := selection.ParseShare(val)
			if err != nil || v <= 0 || v > 1 || (key == "hysteresis" && v >= 0.5) {
				return nil, d.Errf("scaling %s: want a share such as 0.7 or 70%% (hysteresis below 50%%), got %q", key, val)
			}
			if key == "hysteresis" {
				sc.Hysteresis = v
			} else {
				sc.TargetUtilisation = v
			}
		case "min_interval", "smoothing", "every":
			v, err := caddy.ParseDuration(val)
			if err != nil || v <= 0 {
				return nil, d.Errf("scaling %s: want a positive duration, got %q", key, val)
			}
			switch key {
			case "min_interval":
				sc.MinInterval = caddy.Duration(v)
			case "smoothing":
				sc.Smoothing = caddy.Duration(v)
			default:
				sc.Every = caddy.Duration(v)
			}
		case "min_replicas", "max_replicas":
			n, err := strconv.Atoi(val)
			if err != nil || n < 1 {
				return nil, d.Errf("scaling %s: want a whole number of at least 1, got %q", key, val)
			}
			if key == "min_replicas" {
				sc.MinReplicas = n
			} else {
				sc.MaxReplicas = n
			}
		default:
			return nil, d.Errf("scaling: unknown option %q", key)
		}
	}
	if err := sc.Validate(); err != nil {
		return nil, d.Err(err.Error())
	}
	return sc, nil
}
