"""The Dagster code location: every asset, check, job, sensor and schedule, gathered here."""

import dagster as dg

defs = dg.Definitions()
