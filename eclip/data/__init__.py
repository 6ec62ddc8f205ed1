"""Product catalogues: manifest format, synthetic catalogue, readers and datasets."""
