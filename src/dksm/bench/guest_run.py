"""One measured run of ``dksm bench runtime``: a VMM process of its own, as each
Firecracker process is, running one microVM from start to shutdown.

Started as ``python -m dksm.bench.guest_run ORDER.json``, where the order holds the
VM (a fleet member spec: config, dedup mode, pool domain, KSM scope), a timeout, and
where to write the guest's console and the result.  The VM is built and run exactly
as ``dksm run`` builds and runs one (:class:`dksm.fleet.instance.Instance`); what this
adds is the one measurement only the process itself can take: how long the guest ran,
from its first instruction to its shutdown, without the interpreter's start-up and
the VM's construction and teardown around it.  The process confines itself once the
VM is built, as ``dksm run`` does (the order's ``confine``: the ids, or null for
``--no-confine``), so the measured VMM runs under the same seccomp filter as any
other.  Everything else about the process (faults, context switches, CPU time,
hardware counters) the parent reads from outside.  Exit status: the one ``dksm run``
would give for the same ending.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from dksm.fleet.control import confinement_from_json, spec_from_json
    from dksm.fleet.instance import Instance
    from dksm.vmm.exit_status import status_for

    order = json.loads(Path(argv[0]).read_text())
    _, spec = spec_from_json(order["spec"])
    confinement = confinement_from_json(order.get("confine"))
    # Both files are opened before confinement: a confined VMM opens none.
    with (
        open(order["console"], "wb", buffering=0) as console,
        open(order["result"], "w") as result_file,
    ):
        began = time.monotonic()
        with Instance(spec, console) as instance:
            if confinement is not None:
                confinement.apply()
            built = time.monotonic()
            outcome = instance.run(timeout=float(order["timeout"]))
            ended = time.monotonic()
        status = status_for(outcome.cause)
        result = {
            "ending": outcome.describe(),
            "status": int(status),
            "build_s": built - began,
            "run_s": ended - built,
        }
        result_file.write(json.dumps(result))
    return int(status)


if __name__ == "__main__":
    from dksm.error import DksmError

    try:
        sys.exit(main(sys.argv[1:]))
    except DksmError as error:
        print(f"dksm: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole foreground process group
        sys.exit(130)
