"""advcam.models."""
