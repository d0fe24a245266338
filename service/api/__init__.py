"""HTTP layer: routes, schemas, error mapping. Never imports torch."""
