"""Text: tokenizers (SentencePiece, tekken) and Mistral's chat formats."""
