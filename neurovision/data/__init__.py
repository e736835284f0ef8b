"""Data contracts every stage reads."""
