"""The data role: the download, check and preprocess stages.

    datasets.py    each data set's four IDX files, checksums and mirrors
    download.py    the download stage: fetch, verify, swap data/raw in atomically
    freshness.py   the check stage: the source's fingerprint, so unchanged data skips the pipeline
    idx.py         the IDX format (reading and validating the raw files)
    preprocess.py  the preprocess stage: compact train/val/test arrays in data/processed
"""
