"""Deduplication: the page pool (dksm's own, load-time merging) and Linux KSM control.

``pool`` shares each distinct read-only page of a domain through one tmpfs file;
``index``, ``pages_file``, ``owner`` and ``mapping`` are its parts (LMDB schema, the
pages file, process identity, mapping already-referenced pages); ``store`` finds,
creates and removes a domain's files, under the rules of ``trust`` (only the owner
may change them, nothing is followed through a symlink), after ``index_file`` has
checked LMDB's data file; ``pool_errors`` holds the pool's errors.  ``ksm`` drives
the kernel's scanner, the baseline dksm is measured against.  Usable by any Python
program: nothing here imports the VMM.
"""
