"""Long-lived sites and coordinator: organisations' agents that take part in many jobs
(docs/sites.md)."""
