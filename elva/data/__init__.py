"""Data readers (M-BEIR, NLI pairs) and the synthetic multi-grain benchmark generator."""
