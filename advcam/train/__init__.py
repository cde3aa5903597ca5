"""advcam.train."""
