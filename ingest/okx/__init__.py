"""Everything OKX-specific and pure: endpoints, channels, signing, error codes."""
