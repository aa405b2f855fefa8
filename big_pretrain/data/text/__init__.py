"""Text: caption tokenizers (FLIP) and the label vocabulary (WSP)."""
