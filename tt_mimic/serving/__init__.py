"""Serving: SavedModel export, the Recommender, the HTTP server, the
catalog of new books."""
