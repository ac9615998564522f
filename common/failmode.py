"""What a meshed pod's connections do while its node's agent is down, named once.

`open`: straight to their destination, unmeshed; `closed`: refused. Set by the
`meshagent.io/fail-mode` label on the Namespace or the Pod (the Pod wins). Its own module, free
of imports: `meshagent status` reads saved snapshots without loading the snapshot's schema, and
the datapath's map mirror needs only the names.
"""

from __future__ import annotations

FAIL_MODE_LABEL = "meshagent.io/fail-mode"
FAIL_MODES = ("closed", "open")
DEFAULT_FAIL_MODE = "closed"
