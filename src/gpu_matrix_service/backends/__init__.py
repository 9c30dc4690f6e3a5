"""Compute backends behind one Protocol (:mod:`.base`), chosen through :mod:`.registry`."""
