"""Memory beyond one task: session memory in Redis and long-term memory in a vector index.

- `swarm.memory.session`: each user's conversation history per session (the A2A context id),
  in Redis, with a per-agent policy (last N exchanges, a token budget or a rolling summary).
- `swarm.memory.longterm`: records with embeddings in LanceDB, scoped by namespace (user,
  swarm, shared), deduplicated, deletable by id, user and age.
- `swarm.memory.embed`: embedders for any OpenAI-compatible `/v1/embeddings` endpoint, and the
  bundled all-MiniLM-L6-v2 in process; `swarm.memory.serve` serves it as a Ray Serve app.
- `swarm.memory.service`: what agents use: the `memory` tool server and the layer that puts
  history and recalled memories into a turn's context.

Importing this package imports none of redis, lancedb or torch.
"""
