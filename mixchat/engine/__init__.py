"""The engine: loading a model, generating from it, sampling, and the benchmark."""
