"""The swarm as an A2A v1.0 agent: an HTTP app on Ray Serve, built from a2a-sdk's server pieces.

- `card`: the agent card (a skill per agent of the config; the JSON-RPC and REST interfaces;
  streaming), checked as a2a-sdk's client parses it.
- `store`: a2a-sdk's `TaskStore` over the supervisor's task table (GetTask and ListTasks see
  every task of the swarm; nothing is kept in the Serve replica), and the request handler.
- `executor`: the `AgentExecutor`: a new message is a new task; a message naming a task that
  waits in INPUT_REQUIRED answers it; cancel is the supervisor's cancel.
- `bridge`: the link to the supervisor (`RayLink`, or `LocalLink` in one process), the swarm's
  events as A2A status and artifact updates, and how a follow-up message is read.
- `app`: the Starlette app (card, JSON-RPC at `/`, REST under `/rest`, a body size limit) and
  its Serve deployment (`deploy_a2a`, used by `swarm up --a2a` or `a2a: {serve: true}`).
- `listing`: ListTasks paging, run inside the supervisor actor.

Answering a question over A2A: send a message with the task's id (and context id). For an
approval gate: the text `approve [GATE]` or `deny [GATE] [reason]` (GATE may be left out while
one gate is open), or a data part `{"approve": GATE, "args": {...}}` (run with these arguments)
/ `{"deny": GATE, "reason": "..."}`. For a question (`rerun` / `skip` after a crash,
`continue` / `stop` for a stuck task): one of its choices as text, or `{"answer": CHOICE}`.
The INPUT_REQUIRED status message says the same in text and carries a data part with the open
`gates` or the `choices`. A message without a task id is always a new task (in its context, if
it names one). The approver and the task's user are the authenticated user, else the message's
`metadata.user`, else "a2a".

Submodules import a2a-sdk's server and Starlette; this package's `__init__` imports nothing,
so the supervisor can use `listing` cheaply.
"""
