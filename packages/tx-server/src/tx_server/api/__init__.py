"""HTTP layer: dependencies, error responses and the route modules (thin handlers only)."""
