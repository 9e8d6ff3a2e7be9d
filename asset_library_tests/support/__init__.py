"""What the tests share that is not a fixture: the real services they start (SeaweedFS,
PostgreSQL, Dagster's daemon and webserver, a Ray cluster, a live HTTP server), synthetic
lake rows and the photo set. Fixtures stay in ``conftest.py``."""
