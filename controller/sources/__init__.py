"""Where the controller's picture of the cluster comes from.

A source turns one origin of Kubernetes objects (the API server's list+watch in
`kubernetes`, a folder of manifests in `files`) into calls on a `ClusterSink`
(`sink`), which the model implements; both sources hand over the same plain
object dicts, so one parsing and validation path serves them.
"""
