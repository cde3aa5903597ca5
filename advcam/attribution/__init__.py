"""advcam.attribution."""
