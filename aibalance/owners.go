package aibalance

import (
	"sync"
	"time"
)

// Stateful Responses. A Responses API request with previous_response_id
// (or conversation) continues a history stored on the server that produced
// it, not carried in the request: another backend answers 404. So the
// balancer learns, from each answer, which backend stored which response
// (and served which conversation), and sends a continuation there while
// that backend is healthy. Nothing else is shared: the mapping is bounded,
// forgets its oldest entries first, and trusts an entry for ownerTTL.

// ownerTTL is how long a learned owner is trusted (OpenAI keeps stored
// responses for 30 days; engines keep them in memory, lost on restart).
const ownerTTL = 24 * time.Hour

// ownerLimit bounds each shard's generation; 16 shards, two generations.
const ownerLimit = 16384

type ownerEntry struct {
	addr string
	at   int64
}

type ownerShard struct {
	mu       sync.Mutex
	cur, old map[string]ownerEntry
}

// owners is sharded by the id's hash: no one lock for every request.
var owners [16]ownerShard

func ownerShardOf(id string) *ownerShard {
	h := uint32(2166136261)
	for i := 0; i < len(id); i++ {
		h ^= uint32(id[i])
		h *= 16777619
	}
	return &owners[h%uint32(len(owners))]
}

// RecordOwner records that the backend at addr stored id (a response id,
// or "conversation:" and a conversation id) at now.
func RecordOwner(id, addr string, now time.Time) {
	if id == "" || len(id) > 256 {
		return
	}
	s := ownerShardOf(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		s.cur = make(map[string]ownerEntry)
	}
	if _, ok := s.cur[id]; !ok && len(s.cur) >= ownerLimit {
		s.old, s.cur = s.cur, make(map[string]ownerEntry)
	}
	s.cur[id] = ownerEntry{addr: addr, at: now.UnixNano()}
}

// Owner returns the backend that stored id, if learned within ownerTTL.
func Owner(id string, now time.Time) (string, bool) {
	if id == "" {
		return "", false
	}
	s := ownerShardOf(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.cur[id]
	if !ok {
		e, ok = s.old[id]
	}
	if !ok || now.UnixNano()-e.at > int64(ownerTTL) {
		return "", false
	}
	return e.addr, true
}

// StatefulKey is the id whose owner a request must reach: its
// previous_response_id, else its conversation; "" when it has neither.
func (f *Features) StatefulKey() string {
	if f.PreviousResponseID != "" {
		return f.PreviousResponseID
	}
	if f.Conversation != "" {
		return "conversation:" + f.Conversation
	}
	return ""
}
