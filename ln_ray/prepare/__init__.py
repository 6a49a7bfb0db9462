"""Turn raw rows into tokenized traces: validate, segment, render, tokenize."""
