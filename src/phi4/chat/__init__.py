"""`phi4 chat`: a terminal conversation with phi4 or any OpenAI-compatible endpoint."""
