"""One client connection and its upstream: startup, the relay, and the hooks features use.

session.py  phases, I/O, how a session ends
handshake.py  startup packets and authentication, sans-I/O
relay.py  the READY path, and who reads the server stream
hooks.py  the named hooks of the relay
rules.py, timeouts.py  the features that use them
"""

from proxy.session.session import Phase, Session, SessionHost

__all__ = ["Phase", "Session", "SessionHost"]
