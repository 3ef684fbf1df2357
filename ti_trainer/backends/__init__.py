"""Backends wrap one loaded model and expose what training needs (DESIGN.md, Layers)."""
