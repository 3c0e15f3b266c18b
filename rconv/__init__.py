"""The R-CONV suite's implementation, one concern per module (see ARCHITECTURE.md).

Import the public API from the facade, `import rconv_core as rc`; the modules here are
its building blocks, and their other names may change.
"""
