"""asset-library: an image asset library on Dagster."""
