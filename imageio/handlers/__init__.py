"""HTTP resource handlers, one module per resource."""
