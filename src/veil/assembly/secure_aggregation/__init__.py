"""Secure aggregation as a plug-in: one interface (`base`), found by name (`registry`), with one
module per built-in backend (`plain`, `secagg`, `ckks`, `tee`).

Importing this package loads nothing; the registry imports a built-in backend when it is first
asked for (so `veil --help` and the config stay light).
"""
