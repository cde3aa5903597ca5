"""advcam.refine."""
