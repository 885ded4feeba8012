"""One writer per model family: a random checkpoint in the family's own hub layout (config,
weights, tokenizer and processor files), for tests that load it through the runtime."""
