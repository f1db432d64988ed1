"""The model: mixchat's own PyTorch Mistral/Mixtral transformer and its KV cache."""
