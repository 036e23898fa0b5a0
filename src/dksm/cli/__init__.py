"""The ``dksm`` command line: parsing, and the one place errors become exit codes.

Subcommands live in their own modules and import what they need when they run, so
that ``dksm run`` starts fast and pays nothing for plotting or benchmarking code.
"""
