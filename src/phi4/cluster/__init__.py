"""phi4 on Ray Serve: N engine replicas behind one ingress (the same FastAPI app), a prefix-aware router,
and fleet-wide health and metrics. Imported only when `phi4 serve` is given a replica option."""
