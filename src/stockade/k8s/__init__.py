"""Kubernetes cluster sync: pods become Stockade workloads (issue 15, first slice).

* :mod:`.mapping` - pure: a pod + its namespace -> the workload body, or a reason to skip it;
* :mod:`.reflector` - list + watch of one resource kind with resourceVersion, bookmarks,
  re-list on 410 Gone and backoff (on ``kubernetes_asyncio``);
* :mod:`.controller_client` - the Stockade REST API as the sync's only way into the controller;
* :mod:`.sync` - keeps the controller's ``k8s.*`` workloads equal to the cluster's pods.

The sync runs *beside* the controller as its own process and writes through the REST API with
an API key: it imports nothing of the controller (tests/unit/test_layering.py), every change it
makes is authorised and audited like a human's, and the same binary can run inside a cluster.
"""
