"""One module per pipeline stage, each with a single ``run(cfg, **paths)`` (IRN's step/ layout)."""
