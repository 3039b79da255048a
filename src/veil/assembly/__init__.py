"""The composition root: the only code that reads a `RunConfig` and builds a run's parts from it.

Simulation (`veil.runtime`), a deployment's server and members (`veil.deployment`), Ray and the
audit all call these public builders, so one configuration builds the same parts everywhere:

- `data`: the federated data, the server's test evaluator, the pooled baseline.
- `model`: the model and the training plan.
- `privacy`: the differential-privacy policy (record or client level) and the privacy record.
- `stages`: the update compressor, a member's client stages and its `ClientRunner` (one builder
  for simulation and deployment).
- `strategy`: the strategy, the aggregator chain, and the optional parts of `[robust]`,
  `[attack]`, `[stragglers]` and `[ray]`.
- `secure_aggregation`: the secure-aggregation interface, its registry and the built-in
  backends (plain, SecAgg, CKKS, TEE).
- `federation`: a server's whole federation, assembled from the parts above.
- `audit`: a finished run rebuilt from its folder for `veil audit`.

The mechanisms under `veil.privacy` and `veil.federation` take plain parameters and never read
the config; this package turns the config into those parameters. Importing it loads nothing.
"""
