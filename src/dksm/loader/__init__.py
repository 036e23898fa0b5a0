"""Kernel images: parse and validate them into :class:`~dksm.loader.segment.Segment`\\ s.

The loader never touches KVM or guest RAM: it says what goes where, and whether the
guest may write it.  That split is what lets the page pool decide, page by page,
what to share.
"""
