"""kyrie-engine: a Postgres-native job runner and AI engine for KyrieOS."""

__version__ = "0.1.0"
