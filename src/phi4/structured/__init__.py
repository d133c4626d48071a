"""Structured outputs: grammars (llguidance) that every sampled token must follow."""
