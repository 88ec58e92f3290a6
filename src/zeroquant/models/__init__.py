"""Every Hugging Face convention: the adapter table, loading, attention registration."""
