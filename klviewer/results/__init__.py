"""The results-folder contract: slice npz files, summary rows and files, read and written in one place.

`analyze`, `batch`, the app's session export and `export` all go through this package.
"""
