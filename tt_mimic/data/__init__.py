"""Data: CSV parsing and ingest, preprocessing layers, tf.data pipelines, the
synthetic generator. Imports nothing above it."""
