"""Workload identities on a node: private keys made here, certificates signed by the controller.

`IdentityManager` owns every workload certificate of the node and keeps each one fresh;
`keys` makes the keys and CSRs it sends.
"""

from meshagent.agent.identity.keys import build_csr, key_pem, new_key
from meshagent.agent.identity.manager import (
    IdentityManager,
    IdentityUnavailable,
    Signer,
    WorkloadCert,
)

__all__ = [
    "IdentityManager",
    "IdentityUnavailable",
    "Signer",
    "WorkloadCert",
    "build_csr",
    "key_pem",
    "new_key",
]
