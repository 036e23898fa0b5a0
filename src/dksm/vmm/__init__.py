"""The microVM monitor: configs (``config``), building a VM (``builder``), running
its vCPU (``machine``)."""
