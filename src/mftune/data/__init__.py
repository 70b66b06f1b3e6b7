"""Data pipeline: formats -> templates -> tokenize (+cache) -> mixture -> packing -> collate."""
