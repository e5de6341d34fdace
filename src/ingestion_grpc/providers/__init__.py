"""Providers: one module per kind of mail store, behind `base.Provider`."""
