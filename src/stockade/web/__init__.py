"""The web console: static ES modules, HTML and CSS served by the controller (no build step).

:mod:`stockade.controller.api.web_mount` serves this directory at ``/``. Everything the console
does goes through the public REST API under ``/api/v1``.
"""
