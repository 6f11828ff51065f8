"""`fedmilm-credentials`: TLS certificates and SuperNode key pairs for a real deployment.

    fedmilm-credentials DIR --nodes 50 --host superlink.example.org --host 10.0.0.5

Writes a CA, a SuperLink certificate valid for every --host, and one OpenSSH ECDSA key pair per
phone (DIR/nodes/node-<i>[.pub]). Existing files are kept, so raising --nodes adds phones.
Register each public key with `flwr supernode register DIR/nodes/node-<i>.pub <connection>`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmilm.deploy.credentials import create_credentials


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="fedmilm-credentials", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write the credentials")
    parser.add_argument("--nodes", type=int, required=True, help="number of SuperNodes")
    parser.add_argument("--host", action="append", default=None,
                        help="SuperLink host name or IP the certificate must be valid for "
                             "(repeatable; default 127.0.0.1 and localhost)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    hosts = tuple(args.host or ("127.0.0.1", "localhost"))
    creds = create_credentials(args.folder, num_nodes=args.nodes, hosts=hosts)
    print(f"CA certificate     {creds.ca_cert}   (give to every SuperNode and flwr CLI)")
    print(f"SuperLink cert/key {creds.server_cert}, {creds.server_key}   (hosts: "
          f"{', '.join(hosts)})")
    print(f"SuperNode keys     {creds.folder / 'nodes'}/node-<0..{args.nodes - 1}>[.pub]")
    print(f"CA private key     {creds.folder / 'ca.key'}   (keep offline; not needed to run)")
