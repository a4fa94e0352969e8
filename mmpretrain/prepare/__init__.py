"""`mmpretrain prepare`: raw image-caption collections and text corpora to WebDataset shards."""
