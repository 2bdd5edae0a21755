"""The Stockade agent: enrol, report the host, enforce the controller's policy and keep it enforced.

Modules: ``state`` (state dir: credential, CA, policy cache), ``hostinfo`` (netlink host
report and address watcher), ``transport`` (the ``ControllerClient`` protocol and its
records), ``http`` (the httpx client), ``fake`` (in-memory controller and firewall for
tests), ``enforcer`` (apply / verify / delta / tamper restore through a backend),
``outbox`` (events, host reports, heartbeats), ``agent`` (the runtime), ``netns``
(entering a network namespace), ``systemd`` (the unit file).
"""
