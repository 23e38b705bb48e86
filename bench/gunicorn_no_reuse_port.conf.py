"""gunicorn.conf.py with reuse_port off: the "before" arm of the connection-split study only."""
import os

_conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gunicorn.conf.py")
with open(_conf) as _fh:
    exec(compile(_fh.read(), _conf, "exec"))
reuse_port = False
