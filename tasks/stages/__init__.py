"""The stages, as peers: none imports another; `catalog` lists them all."""
