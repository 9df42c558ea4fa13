"""Evaluation: the ADM ImageNet protocol (FID, sFID, Inception Score, precision/recall) in PyTorch.

`features` (Inception extractor), `weights` (finding, reading and verifying the Inception weights), `metrics`
(math on features), `inputs` (npz, folders, shards), `reference` (`d2c fid-ref`), `fid` (`d2c fid`), `cache`
(features on disk), `config` (recipe section `fid`).
"""
