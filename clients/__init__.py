"""Flower client side: the ClientApp and the client programs (local training procedures)."""
