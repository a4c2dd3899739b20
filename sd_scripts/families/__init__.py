"""Model families: one package per family (recognising, loading and saving its files, its training maths)."""
