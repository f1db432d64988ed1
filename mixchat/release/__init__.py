"""The release format: a release folder's files, params.json, the inspect/verify report and checksums."""
