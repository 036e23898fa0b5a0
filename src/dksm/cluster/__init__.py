"""Fleets across hosts: each VM placed where its pages already are.

dksm's saving happens only between VMs of one host, so where a VM runs decides what
it saves.  :mod:`.catalog` describes images as placement sees them (the pool keys of
their shareable pages, what each instance costs on its own); :mod:`.placement` is the
pure placement code (cluster state, the sharing-aware policy and the ones users would
otherwise get); :mod:`.simulation` runs it on a simulated cluster at internet scale.
On a real cluster of Ray nodes, :mod:`.agent` is the host agent of one node (its pool
and its fleets), :mod:`.local` a local Ray cluster of several nodes standing for
hosts, and :mod:`.control` the ``dksm cluster`` commands' work.  Ray is an optional
extra (``dksm[cluster]``) imported only by the modules that talk to it.
"""
