"""The application: commands and the bus that runs them, the manager that drives
each sandbox through its lifecycle, the ledger book, checkpoints, read models,
reconciliation, validation and webhooks."""
