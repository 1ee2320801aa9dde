"""Pure logic: parsing, normalizing, books, gaps, records, rate-limit math. No I/O, no clock reads."""
