"""The HTTP routes, one module per group: completions, chat, embeddings, tokenize, adapters, admin."""
