package healthcheck

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// DefaultModelsInterval is how often an engine's /v1/models is read.
const DefaultModelsInterval = 10 * time.Second

// maxModelsBytes bounds a /v1/models answer; a longer one is refused.
const maxModelsBytes = 1 << 20

// maxModels bounds the models kept per backend.
const maxModels = 1024

// errNoModels marks an answer that says the engine does not list its
// models (404, 401, not the OpenAI shape): its models become unknown.
var errNoModels = errors.New("the engine does not list its models")

// ParseModels reads an OpenAI-style model list: {"data": [{"id": ...}]}.
// A model's context length is vLLM's and SGLang's max_model_len, or
// context_length / max_context_length where other servers give them; 0
// when none is given. LoRA adapters, which vLLM lists beside their base
// model, are models of their own. At most maxBytes are read.
func ParseModels(r io.Reader, maxBytes int64) (*aibalance.ServedModels, error) {
	var list struct {
		Data []struct {
			ID               string  `json:"id"`
			MaxModelLen      float64 `json:"max_model_len"`
			ContextLength    float64 `json:"context_length"`
			MaxContextLength float64 `json:"max_context_length"`
		} `json:"data"`
	}
	body, err := io.ReadAll(io.LimitReader(r, maxBytes+1))
	if err != nil {
		return nil, err
	}
	if int64(len(body)) > maxBytes {
		return nil, fmt.Errorf("%w: model list over %d bytes", errTooLarge, maxBytes)
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, fmt.Errorf("%w: %v", errNoModels, err)
	}
	if list.Data == nil {
		return nil, fmt.Errorf("%w: no data array", errNoModels)
	}
	m := &aibalance.ServedModels{Context: map[string]int{}}
	for _, d := range list.Data {
		if d.ID == "" || len(m.Context) >= maxModels {
			continue
		}
		ctx := max(d.MaxModelLen, d.ContextLength, d.MaxContextLength)
		if ctx < 0 || ctx > 1<<30 {
			ctx = 0
		}
		m.Context[strings.Clone(d.ID)] = int(ctx)
	}
	return m, nil
}

// modelsURL is the model list's URL for an upstream whose metrics are at
// metricsURL: the upstream's own port (not metrics_port), path /v1/models.
func modelsURL(addr string, c ScrapeConfig) (string, error) {
	c.Port, c.Path = 0, "/v1/models"
	return metricsURL(addr, c)
}

// FetchModels reads the engine's model list once.
func (s *Scraper) FetchModels(ctx context.Context) (*aibalance.ServedModels, error) {
	ctx, cancel := context.WithTimeout(ctx, max(s.cfg.Timeout, time.Second))
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.modelsURL, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := s.client.Load().Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		Drain(resp.Body)
		return nil, fmt.Errorf("%w: status %d", errNoModels, resp.StatusCode)
	}
	m, err := ParseModels(resp.Body, maxModelsBytes)
	if err != nil {
		return nil, err
	}
	m.At = s.now()
	return m, nil
}
