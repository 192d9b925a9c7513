"""Flower glue: the ClientApp, the ServerApp, and the backends that run them."""
