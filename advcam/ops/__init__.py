"""advcam.ops."""
