"""advcam.data."""
