"""`monet view`: a small local web viewer of an expert atlas (standard-library server, static page)."""
