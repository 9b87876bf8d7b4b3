"""The job queue in billhook's own database: enqueue, claim with a lease, retry, dead-letter.

Modules: `states` (the lifecycle), `retry` (the pure backoff policy), `jobs` (the `Job` row and
enqueue), `claims` (claim, heartbeat, complete, fail, rescue, release), `registry` (kind ->
handler), `worker` (the worker service) with its parts `fetcher` (claim and complete in one
transaction per round), `completer` (completions waiting for that round), `executor` (run jobs
through their handlers, record failures) and `inflight` (the jobs a worker holds), `runner` (the
`billhook run` process tree), `stats` and `metrics` (what status and /metrics show).
"""
