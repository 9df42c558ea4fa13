"""Stage 0 of the pipeline: image folders -> webdataset image shards, and reading them back."""
