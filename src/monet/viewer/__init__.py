"""`monet view`: a small local web viewer of an expert atlas (standard-library server, static page)."""

from monet.viewer.server import make_server, serve

__all__ = ["make_server", "serve"]
