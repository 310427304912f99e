"""Test certificates: a private CA, a server certificate for localhost/127.0.0.1, a client certificate (and
its key) signed by the CA, and a rogue CA's client certificate. Written as PEM files ``ca``, ``server``,
``client`` and ``rogue`` (``.crt`` and ``.key``)."""

from __future__ import annotations

import datetime
from pathlib import Path


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a rogue CA's client."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, key, issuer_name, issuer_key, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem: str, cert, key) -> None:
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    import ipaddress

    ca_key, rogue_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = issue("splitinfer test CA", ca_key, name("splitinfer test CA"), ca_key, True)
    rogue = issue("rogue CA", rogue_key, name("rogue CA"), rogue_key, True)
    write("ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    write("server", issue("localhost", server_key, ca.subject, ca_key, False,
                          [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
          server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", issue("edge-1", client_key, ca.subject, ca_key, False), client_key)
    rogue_client_key = ec.generate_private_key(ec.SECP256R1())
    write("rogue", issue("edge-rogue", rogue_client_key, rogue.subject, rogue_key, False), rogue_client_key)
    return {n: directory / f"{n}.crt" for n in ("ca", "server", "client", "rogue")}
