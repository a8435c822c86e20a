"""Looking inside Monet: routing capture, the expert atlas, selection criteria, explain/export, the viewer."""
