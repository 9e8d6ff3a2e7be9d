"""Dagster assets, split by stage."""
