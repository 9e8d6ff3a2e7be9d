"""The Dagster layer: thin and declarative over the plain-Python core."""
