"""The Firecracker-compatible front door: Firecracker's REST API over a Unix socket,
its process flags' log and metrics files, and the controller that turns API calls
into a dksm microVM.  Above the fleet layer (it runs an :class:`~dksm.fleet.instance.
Instance` with its pool lease), below the command line."""
