"""Reading Kubernetes-style YAML manifests (files with one or many documents).

Shared by the lab (which builds pods from them) and the controller's file
source (which feeds them to the cluster model).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml


class ManifestError(ValueError):
    """A manifest file that is not YAML or not Kubernetes objects; names the file."""


def load_documents(text: str, origin: str = "<text>") -> list[dict]:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{origin}: not valid YAML: {exc}") from None
    out: list[dict] = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
            raise ManifestError(f"{origin}: document {index} is not a Kubernetes object")
        if doc["kind"] == "List" or (doc["kind"].endswith("List") and "items" in doc):
            out.extend(item for item in doc.get("items") or [] if isinstance(item, dict))
        else:
            out.append(doc)
    return out


def load_files(paths: Iterable[Path]) -> list[dict]:
    objects: list[dict] = []
    for path in paths:
        objects.extend(load_documents(Path(path).read_text(), str(path)))
    return objects
