"""Observability: OpenTelemetry traces per task (GenAI semantic conventions), the swarm's own
trace store, and the `swarm trace` renderer. Importing this package starts nothing; a process
gets its tracing from `tracing.configure` (Ray actors) or `tracing.install` (tests).

Also: Ray dashboard metrics (`metrics`), the usage and cost ledger (`usage`), and the middleware
layer that feeds both (`metering`)."""
