"""The WebDataset shard format, owned once: member and key rules (format), a dataset folder's files
(layout), patterns to shards with sizes (resolve), the one reader, the writer, and inspect."""
