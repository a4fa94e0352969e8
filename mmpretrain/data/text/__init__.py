"""Text for the online stage: the tokenizer, MLM masking, and the text-branch objectives' batches."""
