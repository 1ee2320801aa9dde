"""Long-running units composed from core and io: consumer, backfill worker."""
