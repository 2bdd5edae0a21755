"""The one codec between policy documents and the frozen domain model.

Policy reaches Stockade as YAML files (``stockade.policyfile``) and as REST bodies
(``stockade.controller``); both are documents of the same kinds, read here by the same code:

* ``tree`` - the document tree (YAML's node graph; ``node_of`` maps JSON into it) and a
  ``Reader`` that reads it with field paths and, for YAML, line numbers;
* ``syntax`` - the small textual syntaxes inside documents (service ports and ICMP types,
  CIDRs, addresses, workload addresses);
* ``documents`` - every per-document rule: one document -> one model object;
* ``bodies`` - REST bodies: ``decode`` (through ``documents``) and ``encode`` (canonical
  stored bodies).

It imports only ``stockade.model`` and ``stockade.errors``; the YAML loader and the
controller both import it, so there is one place to decide what a valid document is.
"""
