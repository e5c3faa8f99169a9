"""Pinned upstream clones and the patch series applied to them."""
