"""Zero-shot evaluation of ECLIP models on a held-out catalogue."""
