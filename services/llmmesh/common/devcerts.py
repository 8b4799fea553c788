"""Development certificates: `python -m llmmesh.common.devcerts DIR [--san NAME ...]`.

Writes into DIR (PEM files; keys readable by the owner only):
- `ca.pem`, `ca.key`: the mesh's internal CA. Every service trusts it (`LLMMESH_<SERVICE>_TLS_CA_FILE`):
  servers require client certificates it signed (mutual TLS), channels verify servers against it.
- `gateway.pem|.key`, `preprocess.pem|.key`, `infer.pem|.key`, `postprocess.pem|.key`: one certificate per
  service, usable as server and as client (extended key usage serverAuth + clientAuth). SANs: the service
  name (its compose/Kubernetes name), `localhost`, `127.0.0.1`, `::1`, and any `--san`.
- `public-ca.pem`, `public-ca.key`, `client.pem|.key`: a second CA for public clients and one client
  certificate it signed. Public client certificates are deliberately not signed by the internal CA: the
  internal services trust every certificate that CA signed, so a public client must not hold one.

For development and tests only: production certificates come from the deployment's own PKI.
`make_ca` and `issue` are public so tests can mint an unrelated ("rogue") CA and certificates.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["MESH_SERVICES", "Authority", "DevCerts", "issue", "main", "make_ca", "write_dev_certs"]

MESH_SERVICES = ("gateway", "preprocess", "infer", "postprocess")
_LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_VALIDITY = datetime.timedelta(days=365)


def _now() -> datetime.datetime:
    # Backdated a little so a certificate is valid at once on a machine whose clock lags.
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, fmt, serialization.NoEncryption())


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate and signing key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, ca: bool
) -> x509.CertificateBuilder:
    """What a CA and a leaf certificate share: names, key, serial, validity, constraints and key usage."""
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=not ca,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def make_ca(common_name: str = "llmmesh dev CA") -> Authority:
    """A fresh self-signed CA (EC P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return Authority(_builder(name, name, key, ca=True).sign(key, hashes.SHA256()), key)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue(
    ca: Authority, common_name: str, names: Iterable[str] = (), server: bool = True, client: bool = True
) -> tuple[bytes, bytes]:
    """A leaf certificate signed by `ca`: (certificate PEM, private key PEM). `names` become SANs (DNS or IP)."""
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(subject, ca.cert.subject, key, ca=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    sans = list(dict.fromkeys(names))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in sans]), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


@dataclass(frozen=True)
class DevCerts:
    """Where `write_dev_certs` put everything."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def public_ca(self) -> Path:
        return self.directory / "public-ca.pem"

    def cert(self, name: str) -> Path:
        """`name`: a service, or `client` (the public client)."""
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    if secret:
        # Created owner-only from the start, not chmod-ed after the key is on disk.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def write_dev_certs(directory: Path, extra_names: Sequence[str] = ()) -> DevCerts:
    """Generates the internal CA, one certificate per service, the public CA and one public client certificate."""
    out = DevCerts(Path(directory))
    out.directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca("llmmesh dev internal CA")
    _write(out.ca, ca.cert_pem)
    _write(out.directory / "ca.key", ca.key_pem, secret=True)
    for service in MESH_SERVICES:
        cert, key = issue(ca, service, (service, *_LOCAL_NAMES, *extra_names))
        _write(out.cert(service), cert)
        _write(out.key(service), key, secret=True)
    public = make_ca("llmmesh dev public-client CA")
    _write(out.public_ca, public.cert_pem)
    _write(out.directory / "public-ca.key", public.key_pem, secret=True)
    cert, key = issue(public, "client", server=False)
    _write(out.cert("client"), cert)
    _write(out.key("client"), key, secret=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmmesh.common.devcerts", description="generate a development CA and mesh certificates"
    )
    parser.add_argument("directory", type=Path, help="where to write the PEM files (created if missing)")
    parser.add_argument(
        "--san", action="append", default=[], help="another DNS name or IP for every service certificate (repeatable)"
    )
    args = parser.parse_args(argv)
    certs = write_dev_certs(args.directory, args.san)
    print(f"wrote the internal CA, {', '.join(MESH_SERVICES)}, the public CA and client to {certs.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
