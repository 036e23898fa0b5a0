"""Image analysis: which pages of guest images the page pool would share, which it
would not, and why.

Everything here works on image files alone, with the loader's own rules (no KVM, no
pool): :mod:`.pages` classifies each image's pages, :mod:`.sharing` compares images
page by page and attributes pages to sections and symbols, :mod:`.shifted` finds
byte runs that two images hold at different addresses, :mod:`.predict` turns the
page sets into the memory of a fleet under each dedup mode, :mod:`.analysis` ties
them together and :mod:`.report` renders the result (table, JSON, heatmap).
"""
