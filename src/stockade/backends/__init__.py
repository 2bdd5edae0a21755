"""Enforcement backends: one module per target behind ``base.Backend``, found through ``registry``."""
