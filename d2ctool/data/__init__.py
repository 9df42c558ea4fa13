"""Stage 0 of the pipeline: image folders -> webdataset image shards, and reading them back; the encoded-shard
contract that `d2c encode` writes and both stages read (encoded.py)."""
