"""Text: caption tokenizers (FLIP), the label vocabulary (WSP), and the command that builds
their vocabulary files from a source's texts (build_vocabulary.py)."""
