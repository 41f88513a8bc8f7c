"""Governance: budgets and termination, stuck detection (and, beside them, approvals, rate
limits and audit). Each feature is a plain module plus a `Middleware` layer
(swarm.runtime.middleware) and, where it needs the whole task, a few supervisor checks."""
