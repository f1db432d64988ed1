"""The Textual app. Only this package imports Textual; it never touches tensors."""
