"""Datasets: discovery of scans and labels, caching, collation, and synthetic phantoms."""
