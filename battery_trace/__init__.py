"""battery-trace: the one import namespace of everything this project installs.

The repository keeps its parts at the top (``protocol/``, ``agent/``, ``server/``, ``firmware_stubs/``);
the build maps each into this package (``battery_trace.protocol`` and so on, see pyproject.toml), so an
installed wheel adds no generic top-level name such as ``server`` or ``protocol`` beside other software.
This folder itself holds the plumbing both sides use that is not the wire contract: reading config
files (``settings``), TLS contexts (``tls``) and size-bounded reads of files a person names
(``bounded_read``).
"""
